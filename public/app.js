// The exec-gateway dashboard: plain ES modules, no build step. It talks to the public API exactly
// as any client would (fetch + the WebSocket attach), so it needs nothing the API does not offer.
// This module wires the page together; the parts:
//   api.js       the API client and the saved token
//   page.js      the page's elements, the exec bar's badges, the error line
//   terminal.js  the xterm.js terminal
//   events.js    the exec on screen: its stream, reconnects, output and events
//   lists.js     the sandboxes and recent execs
//   durations.js how long each exec ran (clock.js: the gateway's clock)
//   utf8.js      output chunks cut at character boundaries
import { Api, ApiError } from './api.js'
import { showDuration, startTicking } from './durations.js'
import { Viewer } from './events.js'
import { Lists } from './lists.js'
import { el, ErrorLine, setStatus } from './page.js'
import { Screen } from './terminal.js'

const POLL_MS = 2000

const api = new Api()
el.token.value = api.token
const errors = new ErrorLine()
const screen = new Screen(el.terminal)
const viewer = new Viewer({
  api,
  screen,
  errors,
  onFinished: () => {
    void lists.refreshRecent()
    void lists.refreshSandboxes()
  }
})
const lists = new Lists({ api, errors, viewer })

el.kill.addEventListener('click', async () => {
  const a = viewer.current
  if (a === undefined || a.final) return
  try {
    await api.call('POST', `v1/execs/${encodeURIComponent(a.id)}/signal`, { signal: 'KILL' })
  } catch (err) {
    errors.show('kill', err)
  }
})

el.runForm.addEventListener('submit', async (e) => {
  e.preventDefault()
  errors.clear()
  const text = el.command.value
  if (lists.selectedSandbox === undefined) {
    errors.show('run', new Error('choose a sandbox first'))
    return
  }
  const tty = el.tty.checked
  const body = { command: ['sh', '-c', text], tty, interactive: tty }
  if (tty) {
    screen.fit()
    body.cols = screen.term.cols
    body.rows = screen.term.rows
  }
  el.run.disabled = true
  try {
    const exec = await api.call('POST', `v1/sandboxes/${encodeURIComponent(lists.selectedSandbox)}/execs`, body)
    viewer.attach(exec)
    void lists.refreshRecent()
  } catch (err) {
    viewer.detach()
    screen.term.reset()
    el.execId.textContent = '–'
    el.execSandbox.textContent = lists.selectedSandbox
    showDuration(el.duration, {})
    setStatus('failed', err instanceof ApiError ? err.short : 'failed')
    errors.show('run', err)
  } finally {
    el.run.disabled = false
  }
})

el.tokenForm.addEventListener('submit', (e) => {
  e.preventDefault()
  api.saveToken(el.token.value.trim())
  errors.clear()
  void lists.refresh()
})

el.forgetToken.addEventListener('click', () => {
  api.saveToken('')
  el.token.value = ''
  void lists.refresh()
})

// What the page needs from the gateway beyond the API: its heartbeat interval. Asked again by
// the next poll while it cannot be had; until then the viewer assumes the default.
async function configure () {
  try {
    const { heartbeatIntervalMs } = await api.call('GET', 'dashboard/config')
    viewer.heartbeatEvery(heartbeatIntervalMs)
    return true
  } catch {
    return false
  }
}

// Every POLL_MS, skipping a round while the last one is still waiting for the gateway.
function startPolling () {
  let polling = false
  let configured = false
  const poll = async () => {
    if (!polling) {
      polling = true
      try {
        const [ok] = await Promise.all([configured || configure(), lists.refresh()])
        configured = ok
      } finally { polling = false }
    }
    setTimeout(() => { void poll() }, POLL_MS)
  }
  void poll()
}
startPolling()
startTicking()

// For scripts and tests driving the page: what the terminal shows, once parsed.
window.dashboard = {
  async terminalText () { await screen.flushed(); return screen.text() },
  // Synchronous, for polling: what xterm.js has parsed so far.
  textNow: () => screen.text(),
  get execId () { return viewer.current?.id },
  get silenceMs () { return viewer.silenceMs },
  get bytesSeen () {
    const a = viewer.current
    return a === undefined ? undefined : { stdout: a.stdoutSeen, stderr: a.stderrSeen }
  }
}
