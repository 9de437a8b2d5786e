// The page's fixed parts (public/index.html): its elements, the exec bar's status and connection
// badges, and the error line.
import { ApiError } from './api.js'

const $ = (id) => document.getElementById(id)
export const el = {
  tokenForm: $('token-form'),
  token: $('token'),
  forgetToken: $('forget-token'),
  error: $('error'),
  sandboxes: $('sandboxes'),
  noSandboxes: $('no-sandboxes'),
  recent: $('recent'),
  recentFilter: $('recent-filter'),
  noRecent: $('no-recent'),
  runForm: $('run-form'),
  command: $('command'),
  tty: $('tty'),
  run: $('run'),
  execId: $('exec-id'),
  execSandbox: $('exec-sandbox'),
  status: $('exec-status'),
  duration: $('exec-duration'),
  connection: $('connection'),
  kill: $('kill'),
  terminal: $('terminal')
}

export function setStatus (state, text, ok = state !== 'failed') {
  el.status.dataset.state = state
  el.status.dataset.ok = String(ok)
  el.status.textContent = text
}

export function setConnection (state, text) {
  el.connection.dataset.state = state
  el.connection.textContent = text
}

export function outcomeText (ex) {
  if (ex.timedOut) return 'timed out'
  if (ex.signal !== null && ex.signal !== undefined) return `signal ${ex.signal}`
  return `exit ${ex.exitCode}`
}

// A failed poll is shown unless an error from something the user did is on the line (that one
// stays until the next action), and is cleared by the next poll that succeeds.
export class ErrorLine {
  #pollErrorShown = false

  show (what, err) {
    this.#pollErrorShown = false
    el.error.textContent = err instanceof ApiError ? `${what}: ${err.short}: ${err.message}` : `${what}: ${String(err?.message ?? err)}`
    el.error.dataset.code = err instanceof ApiError ? err.code : ''
    el.error.hidden = false
  }

  clear () {
    this.#pollErrorShown = false
    el.error.hidden = true
    el.error.textContent = ''
    el.error.dataset.code = ''
  }

  pollFailed (what, err) {
    if (!el.error.hidden && !this.#pollErrorShown) return
    this.show(what, err)
    this.#pollErrorShown = true
  }

  pollOk () { if (this.#pollErrorShown) this.clear() }
}
