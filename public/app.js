// The exec-gateway dashboard: plain ES modules, no build step. It talks to the public API exactly
// as any client would (fetch + the WebSocket attach), so it needs nothing the API does not offer.
import { Terminal } from './assets/xterm/lib/xterm.mjs'
import { FitAddon } from './assets/xterm-addon-fit/lib/addon-fit.mjs'

const TOKEN_KEY = 'exec-gateway.token'
const POLL_MS = 2000
// Binary frames carry raw bytes, so the bytes seen per stream (the resume offsets) are exact even
// for output that is not valid UTF-8. It is also the data subprotocol the server selects, which
// browsers need when a bearer subprotocol is offered (Chromium fails a handshake that offered
// subprotocols and got none back).
const BINARY_SUBPROTOCOL = 'exec-gateway.v1.binary'
const BEARER_PREFIX = 'exec-gateway.bearer.'
const RECONNECT_MIN_MS = 200
const RECONNECT_MAX_MS = 3000
const RECENT_LIMIT = 25
// The gateway sends a heartbeat after 15 s of silence (its default), so a socket silent for this
// long is a dead link that TCP has not noticed (a sleeping laptop, a dropped NAT entry): drop
// it and resume, rather than wait forever for output that cannot arrive.
const SILENCE_MS = 45_000

const $ = (id) => document.getElementById(id)
const el = {
  tokenForm: $('token-form'), token: $('token'), forgetToken: $('forget-token'),
  error: $('error'),
  sandboxes: $('sandboxes'), noSandboxes: $('no-sandboxes'),
  recent: $('recent'), noRecent: $('no-recent'),
  runForm: $('run-form'), command: $('command'), tty: $('tty'), run: $('run'),
  execId: $('exec-id'), execSandbox: $('exec-sandbox'), status: $('exec-status'), connection: $('connection'), kill: $('kill'),
  terminal: $('terminal')
}

// ---- the API ---------------------------------------------------------------------------------

let token = localStorage.getItem(TOKEN_KEY) ?? ''
el.token.value = token

class ApiError extends Error {
  constructor (status, code, detail) {
    super(detail)
    this.status = status
    this.code = code
  }

  get short () { return `${this.status} ${this.code}` }
}

async function api (method, path, body) {
  const headers = {}
  if (token !== '') headers.authorization = `Bearer ${token}`
  if (body !== undefined) headers['content-type'] = 'application/json'
  let res
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: 'no-store' })
  } catch (err) {
    throw new ApiError(0, 'network_error', `the gateway could not be reached (${err.message})`)
  }
  const text = await res.text()
  let parsed
  try { parsed = text === '' ? undefined : JSON.parse(text) } catch { parsed = undefined }
  if (!res.ok) {
    const code = parsed?.code ?? 'http_error'
    throw new ApiError(res.status, code, parsed?.detail ?? parsed?.title ?? (text || res.statusText))
  }
  return parsed
}

function base64url (s) {
  const bytes = new TextEncoder().encode(s)
  let bin = ''
  for (const b of bytes) bin += String.fromCharCode(b)
  return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '')
}

function streamUrl (execId, stdoutOffset, stderrOffset) {
  const u = new URL(`v1/execs/${encodeURIComponent(execId)}/stream`, location.href)
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:'
  u.search = new URLSearchParams({ stdoutOffset: String(stdoutOffset), stderrOffset: String(stderrOffset) }).toString()
  return u.href
}

// ---- the error line --------------------------------------------------------------------------

function showError (what, err) {
  pollErrorShown = false
  el.error.textContent = err instanceof ApiError ? `${what}: ${err.short}: ${err.message}` : `${what}: ${String(err?.message ?? err)}`
  el.error.dataset.code = err instanceof ApiError ? err.code : ''
  el.error.hidden = false
}

function clearError () {
  pollErrorShown = false
  el.error.hidden = true
  el.error.textContent = ''
  el.error.dataset.code = ''
}

// A failed poll is shown unless an error from something the user did is on the line (that one
// stays until the next action), and is cleared by the next poll that succeeds.
let pollErrorShown = false
function pollFailed (what, err) {
  if (!el.error.hidden && !pollErrorShown) return
  showError(what, err)
  pollErrorShown = true
}
function pollOk () { if (pollErrorShown) clearError() }

// ---- the terminal ----------------------------------------------------------------------------

const term = new Terminal({
  convertEol: true,
  scrollback: 10000,
  cursorBlink: false,
  fontSize: 13,
  fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
  theme: { background: '#0f1419', foreground: '#d8dee9' }
})
const fit = new FitAddon()
term.loadAddon(fit)
term.open(el.terminal)
fitTerminal()
new ResizeObserver(() => fitTerminal()).observe(el.terminal)

function fitTerminal () {
  try { fit.fit() } catch { /* not laid out yet */ }
}

// What the terminal holds, as text (wrapped rows joined back): for tests and for copying.
function terminalText () {
  const buf = term.buffer.active
  const lines = []
  for (let i = 0; i < buf.length; i++) {
    const line = buf.getLine(i)
    if (line === undefined) continue
    const text = line.translateToString(true)
    if (line.isWrapped && lines.length > 0) lines[lines.length - 1] += text
    else lines.push(text)
  }
  while (lines.length > 0 && lines[lines.length - 1] === '') lines.pop()
  return lines.join('\n')
}

// Resolves once xterm has parsed everything written so far.
function terminalFlushed () {
  return new Promise((resolve) => term.write('', resolve))
}

const RED = new Uint8Array([0x1b, 0x5b, 0x33, 0x31, 0x6d]) // ESC[31m
const RESET = new Uint8Array([0x1b, 0x5b, 0x30, 0x6d]) // ESC[0m

// ---- the exec being shown --------------------------------------------------------------------

// One attachment at a time: the exec on screen, the bytes of each stream already written to the
// terminal (the offsets a reconnect resumes from, so nothing is shown twice), and its socket.
let current

function setStatus (state, text, ok = state !== 'failed') {
  el.status.dataset.state = state
  el.status.dataset.ok = String(ok)
  el.status.textContent = text
}

function setConnection (state, text) {
  el.connection.dataset.state = state
  el.connection.textContent = text
}

function outcomeText (ex) {
  if (ex.timedOut) return 'timed out'
  if (ex.signal !== null && ex.signal !== undefined) return `signal ${ex.signal}`
  return `exit ${ex.exitCode}`
}

function attach (exec) {
  detach()
  clearError()
  term.reset()
  // A pty already ends lines with CRLF; plain pipes end them with LF only.
  term.options.convertEol = !exec.tty
  current = {
    id: exec.id,
    tty: exec.tty,
    interactive: exec.interactive,
    stdoutSeen: 0,
    stderrSeen: 0,
    final: false,
    ws: undefined,
    timer: undefined,
    watchdog: undefined,
    failures: 0,
    reconnects: 0
  }
  el.execId.textContent = exec.id
  el.execSandbox.textContent = exec.sandboxId
  el.connection.dataset.reconnects = '0'
  el.kill.disabled = false
  setStatus(exec.status, exec.status)
  if (exec.tty) fitTerminal()
  connect(current)
  if (exec.tty && exec.interactive) term.focus()
}

function detach () {
  const a = current
  current = undefined
  if (a === undefined) return
  clearTimeout(a.timer)
  abandon(a)
  setConnection('idle', '')
  el.kill.disabled = true
}

// Closes the socket without waiting for its close handshake, which a dead link never completes.
function abandon (a) {
  clearTimeout(a.watchdog)
  const ws = a.ws
  a.ws = undefined
  if (ws === undefined) return
  ws.onopen = ws.onmessage = ws.onclose = null
  ws.close(1000, 'detached')
}

function armWatchdog (a) {
  clearTimeout(a.watchdog)
  a.watchdog = setTimeout(() => {
    if (a !== current || a.final) return
    abandon(a)
    scheduleReconnect(a)
  }, SILENCE_MS)
}

function connect (a) {
  const protocols = [BINARY_SUBPROTOCOL]
  if (token !== '') protocols.push(BEARER_PREFIX + base64url(token))
  const ws = new WebSocket(streamUrl(a.id, a.stdoutSeen, a.stderrSeen), protocols)
  ws.binaryType = 'arraybuffer'
  a.ws = ws
  setConnection(a.reconnects === 0 ? 'connecting' : 'reconnecting', a.reconnects === 0 ? 'connecting…' : 'reconnecting…')
  armWatchdog(a)
  ws.onopen = () => {
    setConnection('open', a.reconnects === 0 ? 'live' : `live (reconnected ${a.reconnects}×)`)
    // The window may have changed size while the socket was down.
    if (a.tty && !a.final) sendFrame(a, { type: 'resize', cols: term.cols, rows: term.rows })
  }
  ws.onmessage = (m) => {
    a.failures = 0
    armWatchdog(a)
    if (typeof m.data === 'string') onEvent(a, JSON.parse(m.data))
    else onOutput(a, new Uint8Array(m.data))
  }
  ws.onclose = () => {
    if (a !== current) return
    clearTimeout(a.watchdog)
    a.ws = undefined
    if (a.final) { setConnection('closed', 'ended'); return }
    // Dropped before the final event: the exec goes on without us; resume where we stopped.
    scheduleReconnect(a)
  }
}

function scheduleReconnect (a) {
  a.failures++
  const delay = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** (a.failures - 1))
  setConnection('reconnecting', `connection lost; reconnecting in ${(delay / 1000).toFixed(1)} s…`)
  a.timer = setTimeout(() => { void reconnect(a) }, delay)
}

async function reconnect (a) {
  if (a !== current) return
  // A WebSocket that fails says nothing about why; the exec's own URL does (404 when it is gone,
  // 401 when the token no longer works).
  try {
    await api('GET', `v1/execs/${encodeURIComponent(a.id)}`)
  } catch (err) {
    if (a !== current) return
    if (err.status === 404 || err.status === 401 || err.status === 403) {
      a.final = true
      setStatus('failed', err.short)
      setConnection('closed', 'gave up')
      showError(`exec ${a.id}`, err)
      return
    }
    scheduleReconnect(a)
    return
  }
  if (a !== current) return
  a.reconnects++
  el.connection.dataset.reconnects = String(a.reconnects)
  connect(a)
}

function onOutput (a, frame) {
  // Output means the command has started, whatever the last poll said.
  if (el.status.dataset.state === 'pending') setStatus('running', 'running')
  const channel = frame[0]
  const bytes = frame.subarray(1)
  if (channel === 1) {
    a.stdoutSeen += bytes.length
    term.write(bytes)
  } else if (channel === 2) {
    a.stderrSeen += bytes.length
    if (a.tty) term.write(bytes)
    else { term.write(RED); term.write(bytes); term.write(RESET) }
  }
}

function onEvent (a, ev) {
  switch (ev.type) {
    case 'stdout':
    case 'stderr': {
      // Text events (no binary frame for them): skip whatever was already shown.
      const bytes = new TextEncoder().encode(ev.data)
      const seen = ev.type === 'stdout' ? a.stdoutSeen : a.stderrSeen
      const skip = Math.max(0, seen - ev.offset)
      if (skip >= bytes.length) return
      const frame = new Uint8Array(bytes.length - skip + 1)
      frame[0] = ev.type === 'stdout' ? 1 : 2
      frame.set(bytes.subarray(skip), 1)
      onOutput(a, frame)
      return
    }
    case 'gap':
      term.write(`\r\n\x1b[33m[${ev.to - ev.from} bytes of ${ev.stream} were no longer held]\x1b[0m\r\n`)
      if (ev.stream === 'stdout') a.stdoutSeen = Math.max(a.stdoutSeen, ev.to)
      else a.stderrSeen = Math.max(a.stderrSeen, ev.to)
      return
    case 'heartbeat':
      return
    case 'exit':
      a.final = true
      setStatus('exited', outcomeText(ev), ev.exitCode === 0 && ev.signal === null && !ev.timedOut)
      finished(a)
      return
    case 'error':
      a.final = true
      setStatus('failed', `${ev.status} ${ev.code}`)
      showError(`exec ${a.id}`, new ApiError(ev.status, ev.code, ev.message))
      finished(a)
  }
}

function finished (a) {
  clearTimeout(a.watchdog)
  el.kill.disabled = true
  setConnection('closed', 'ended')
  void terminalFlushed()
  void refreshRecent()
  void refreshSandboxes()
  if (a.tty) term.blur()
}

function sendFrame (a, frame) {
  if (a.ws === undefined || a.ws.readyState !== WebSocket.OPEN) return false
  a.ws.send(JSON.stringify(frame))
  return true
}

term.onData((data) => {
  const a = current
  // Keystrokes are stdin only for an exec that reads it from a terminal; elsewhere they would
  // be refused by the gateway (and close the socket).
  if (a !== undefined && a.tty && a.interactive && !a.final) sendFrame(a, { type: 'stdin', data })
})

term.onResize(({ cols, rows }) => {
  const a = current
  if (a !== undefined && a.tty && !a.final) sendFrame(a, { type: 'resize', cols, rows })
})

el.kill.addEventListener('click', async () => {
  const a = current
  if (a === undefined || a.final) return
  try {
    await api('POST', `v1/execs/${encodeURIComponent(a.id)}/signal`, { signal: 'KILL' })
  } catch (err) {
    showError('kill', err)
  }
})

// ---- running a command -----------------------------------------------------------------------

let selectedSandbox

el.runForm.addEventListener('submit', async (e) => {
  e.preventDefault()
  clearError()
  const text = el.command.value
  if (selectedSandbox === undefined) {
    showError('run', new Error('choose a sandbox first'))
    return
  }
  const tty = el.tty.checked
  const body = { command: ['sh', '-c', text], tty, interactive: tty }
  if (tty) {
    fitTerminal()
    body.cols = term.cols
    body.rows = term.rows
  }
  el.run.disabled = true
  try {
    const exec = await api('POST', `v1/sandboxes/${encodeURIComponent(selectedSandbox)}/execs`, body)
    attach(exec)
    void refreshRecent()
  } catch (err) {
    detach()
    term.reset()
    el.execId.textContent = '–'
    el.execSandbox.textContent = selectedSandbox
    setStatus('failed', err instanceof ApiError ? err.short : 'failed')
    showError('run', err)
  } finally {
    el.run.disabled = false
  }
})

// ---- sandboxes -------------------------------------------------------------------------------

function renderSandboxes (list) {
  el.noSandboxes.hidden = list.length > 0
  const ids = new Set(list.map((s) => s.id))
  for (const row of [...el.sandboxes.querySelectorAll('[data-sandbox-id]')]) {
    if (!ids.has(row.dataset.sandboxId)) row.remove()
  }
  if (selectedSandbox !== undefined && !ids.has(selectedSandbox)) selectedSandbox = undefined
  // Until the user chooses, the first connected sandbox is the one commands go to.
  if (selectedSandbox === undefined) selectedSandbox = (list.find((s) => s.status === 'connected') ?? list[0])?.id
  for (const s of list) {
    let row = el.sandboxes.querySelector(`[data-sandbox-id="${CSS.escape(s.id)}"]`)
    if (row === null) {
      row = document.createElement('label')
      row.className = 'sandbox'
      row.dataset.testid = 'sandbox'
      row.dataset.sandboxId = s.id
      const radio = document.createElement('input')
      radio.type = 'radio'
      radio.name = 'sandbox'
      radio.value = s.id
      radio.addEventListener('change', () => { if (radio.checked) selectedSandbox = s.id })
      const name = document.createElement('span')
      name.className = 'name'
      name.textContent = s.id
      const status = document.createElement('span')
      status.className = 'badge'
      const active = document.createElement('span')
      active.className = 'active'
      row.append(radio, name, status, active)
      el.sandboxes.append(row)
    }
    row.dataset.status = s.status
    row.querySelector('.badge').textContent = s.status
    row.querySelector('.active').textContent = `${s.activeExecs} active`
    row.querySelector('input').checked = s.id === selectedSandbox
  }
}

async function refreshSandboxes () {
  try {
    const { sandboxes } = await api('GET', 'v1/sandboxes')
    sandboxes.sort((a, b) => a.id.localeCompare(b.id))
    renderSandboxes(sandboxes)
    pollOk()
  } catch (err) {
    pollFailed('sandboxes', err)
  }
}

// ---- recent execs ----------------------------------------------------------------------------

function commandText (command) {
  // The dashboard's own execs are sh -c "<line>": show the line as typed.
  if (command.length === 3 && command[0] === 'sh' && command[1] === '-c') return command[2]
  return command.join(' ')
}

function summary (ex) {
  if (ex.status === 'exited') return outcomeText(ex)
  if (ex.status === 'failed') return ex.error === null ? 'failed' : `${ex.error.status} ${ex.error.code}`
  return ex.status
}

let recentShown = ''
function renderRecent (execs) {
  el.noRecent.hidden = execs.length > 0
  // Rebuilt only when something changed, so a poll never swaps a button out from under a click.
  const key = JSON.stringify(execs.map((ex) => [ex.id, summary(ex)]))
  if (key === recentShown) return
  recentShown = key
  const items = execs.map((ex) => {
    const li = document.createElement('li')
    const b = document.createElement('button')
    b.type = 'button'
    b.className = 'recent-exec'
    b.dataset.testid = 'recent-exec'
    b.dataset.execId = ex.id
    b.dataset.state = ex.status
    b.title = `${ex.id} on ${ex.sandboxId}, started ${ex.createdAt}`
    const cmd = document.createElement('code')
    cmd.textContent = commandText(ex.command)
    const st = document.createElement('span')
    st.className = 'badge'
    st.textContent = summary(ex)
    const meta = document.createElement('span')
    meta.className = 'meta'
    meta.textContent = `${ex.sandboxId} · ${new Date(ex.createdAt).toLocaleTimeString()}${ex.tty ? ' · tty' : ''}`
    b.append(cmd, st, meta)
    b.addEventListener('click', () => attach(ex))
    li.append(b)
    return li
  })
  el.recent.replaceChildren(...items)
}

async function refreshRecent () {
  try {
    const { execs } = await api('GET', 'v1/execs')
    execs.sort((a, b) => (a.createdAt < b.createdAt ? 1 : a.createdAt > b.createdAt ? -1 : 0))
    renderRecent(execs.slice(0, RECENT_LIMIT))
    // pending → running has no event of its own; the exec record says when it happened.
    const a = current
    const mine = a === undefined ? undefined : execs.find((ex) => ex.id === a.id)
    if (mine !== undefined && !a.final && mine.status === 'running' && el.status.dataset.state === 'pending') setStatus('running', 'running')
    pollOk()
  } catch (err) {
    pollFailed('recent execs', err)
  }
}

// ---- the token -------------------------------------------------------------------------------

el.tokenForm.addEventListener('submit', (e) => {
  e.preventDefault()
  token = el.token.value.trim()
  if (token === '') localStorage.removeItem(TOKEN_KEY)
  else localStorage.setItem(TOKEN_KEY, token)
  clearError()
  void refresh()
})

el.forgetToken.addEventListener('click', () => {
  token = ''
  el.token.value = ''
  localStorage.removeItem(TOKEN_KEY)
  void refresh()
})

// ---- polling ---------------------------------------------------------------------------------

async function refresh () {
  await Promise.all([refreshSandboxes(), refreshRecent()])
}

let polling = false
async function poll () {
  if (!polling) {
    polling = true
    try { await refresh() } finally { polling = false }
  }
  setTimeout(() => { void poll() }, POLL_MS)
}
void poll()

// For scripts and tests driving the page: what the terminal shows, once parsed.
window.dashboard = {
  async terminalText () { await terminalFlushed(); return terminalText() },
  // Synchronous, for polling: what xterm.js has parsed so far.
  textNow: terminalText,
  get execId () { return current?.id },
  get bytesSeen () { return current === undefined ? undefined : { stdout: current.stdoutSeen, stderr: current.stderrSeen } }
}
