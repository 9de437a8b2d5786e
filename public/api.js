// The public API as the dashboard uses it, exactly as any client would (fetch + the WebSocket
// attach), with the API token the user saved, kept in localStorage across reloads.
import { noteServerDate } from './clock.js'

const TOKEN_KEY = 'exec-gateway.token'
// Binary frames carry raw bytes, so the bytes seen per stream (the resume offsets) are exact even
// for output that is not valid UTF-8. It is also the data subprotocol the server selects, which
// browsers need when a bearer subprotocol is offered (Chromium fails a handshake that offered
// subprotocols and got none back).
const BINARY_SUBPROTOCOL = 'exec-gateway.v1.binary'
const BEARER_PREFIX = 'exec-gateway.bearer.'

export class ApiError extends Error {
  constructor (status, code, detail) {
    super(detail)
    this.status = status
    this.code = code
  }

  get short () { return `${this.status} ${this.code}` }
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

export class Api {
  #token = localStorage.getItem(TOKEN_KEY) ?? ''

  get token () { return this.#token }

  // An empty token forgets the saved one.
  saveToken (token) {
    this.#token = token
    if (token === '') localStorage.removeItem(TOKEN_KEY)
    else localStorage.setItem(TOKEN_KEY, token)
  }

  // Resolves with the parsed body; rejects with an ApiError carrying the problem's code.
  async call (method, path, body) {
    const headers = {}
    if (this.#token !== '') headers.authorization = `Bearer ${this.#token}`
    if (body !== undefined) headers['content-type'] = 'application/json'
    let res
    const sentAt = Date.now()
    try {
      res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: 'no-store' })
    } catch (err) {
      throw new ApiError(0, 'network_error', `the gateway could not be reached (${err.message})`)
    }
    noteServerDate(res.headers.get('date'), sentAt, Date.now())
    const text = await res.text()
    let parsed
    try { parsed = text === '' ? undefined : JSON.parse(text) } catch { parsed = undefined }
    if (!res.ok) {
      const code = parsed?.code ?? 'http_error'
      throw new ApiError(res.status, code, parsed?.detail ?? parsed?.title ?? (text || res.statusText))
    }
    return parsed
  }

  // An exec's stream from these offsets, in binary frames. A browser cannot set headers on a
  // WebSocket, so the token rides in a subprotocol.
  openStream (execId, stdoutOffset, stderrOffset) {
    const protocols = [BINARY_SUBPROTOCOL]
    if (this.#token !== '') protocols.push(BEARER_PREFIX + base64url(this.#token))
    const ws = new WebSocket(streamUrl(execId, stdoutOffset, stderrOffset), protocols)
    ws.binaryType = 'arraybuffer'
    return ws
  }
}
