// The side lists: the sandboxes (and which one commands go to) and the recent execs, each
// refreshed from the API by the poll and whenever an exec on screen ends.
import { showDuration } from './durations.js'
import { el, outcomeText, setStatus } from './page.js'

const RECENT_LIMIT = 25

// The recent list's filter: which execs each choice keeps. Active is pending or running, as in
// the sandboxes' "N active".
const FILTERS = {
  all: () => true,
  active: (ex) => ex.status === 'pending' || ex.status === 'running',
  exited: (ex) => ex.status === 'exited',
  failed: (ex) => ex.status === 'failed'
}

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

export class Lists {
  #api
  #errors
  #viewer
  #selectedSandbox
  #recentShown = ''
  // The last list fetched, newest first, so a change of filter shows at once.
  #execs = []

  constructor ({ api, errors, viewer }) {
    this.#api = api
    this.#errors = errors
    this.#viewer = viewer
    el.recentFilter.addEventListener('change', () => this.#renderRecent())
  }

  // The sandbox commands go to; undefined until one has connected.
  get selectedSandbox () { return this.#selectedSandbox }

  async refresh () {
    await Promise.all([this.refreshSandboxes(), this.refreshRecent()])
  }

  async refreshSandboxes () {
    try {
      const { sandboxes } = await this.#api.call('GET', 'v1/sandboxes')
      sandboxes.sort((a, b) => a.id.localeCompare(b.id))
      this.#renderSandboxes(sandboxes)
      this.#errors.pollOk()
    } catch (err) {
      this.#errors.pollFailed('sandboxes', err)
    }
  }

  async refreshRecent () {
    try {
      const { execs } = await this.#api.call('GET', 'v1/execs')
      execs.sort((a, b) => (a.createdAt < b.createdAt ? 1 : a.createdAt > b.createdAt ? -1 : 0))
      this.#execs = execs
      this.#renderRecent()
      // pending → running has no event of its own; the exec record says when it happened.
      const a = this.#viewer.current
      const mine = a === undefined ? undefined : execs.find((ex) => ex.id === a.id)
      if (mine !== undefined && !a.final && mine.status === 'running' && el.status.dataset.state === 'pending') setStatus('running', 'running')
      // A record read before the final event came would start the bar's clock again.
      if (mine !== undefined && !(a.final && mine.endedAt === null)) showDuration(el.duration, mine)
      this.#errors.pollOk()
    } catch (err) {
      this.#errors.pollFailed('recent execs', err)
    }
  }

  #renderSandboxes (list) {
    el.noSandboxes.hidden = list.length > 0
    const ids = new Set(list.map((s) => s.id))
    for (const row of [...el.sandboxes.querySelectorAll('[data-sandbox-id]')]) {
      if (!ids.has(row.dataset.sandboxId)) row.remove()
    }
    if (this.#selectedSandbox !== undefined && !ids.has(this.#selectedSandbox)) this.#selectedSandbox = undefined
    // Until the user chooses, the first connected sandbox is the one commands go to.
    if (this.#selectedSandbox === undefined) this.#selectedSandbox = (list.find((s) => s.status === 'connected') ?? list[0])?.id
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
        radio.addEventListener('change', () => { if (radio.checked) this.#selectedSandbox = s.id })
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
      row.querySelector('input').checked = s.id === this.#selectedSandbox
    }
  }

  #renderRecent () {
    const filter = el.recentFilter.value
    const execs = this.#execs.filter(FILTERS[filter] ?? FILTERS.all).slice(0, RECENT_LIMIT)
    el.noRecent.hidden = execs.length > 0
    el.noRecent.textContent = this.#execs.length === 0 || filter === 'all' ? 'None yet.' : `None ${filter}.`
    // Rebuilt only when something changed, so a poll never swaps a button out from under a click.
    const key = JSON.stringify(execs.map((ex) => [ex.id, summary(ex), ex.startedAt, ex.endedAt]))
    if (key === this.#recentShown) return
    this.#recentShown = key
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
      const duration = document.createElement('span')
      duration.className = 'duration'
      showDuration(duration, ex)
      b.append(cmd, st, meta, duration)
      b.addEventListener('click', () => this.#viewer.attach(ex))
      li.append(b)
      return li
    })
    el.recent.replaceChildren(...items)
  }
}
