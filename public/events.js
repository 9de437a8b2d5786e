// The exec on screen: its stream over a WebSocket, written to the terminal as it comes, resumed
// where it stopped when the socket drops, until the final event (exit or error).
import { ApiError } from './api.js'
import { serverNow } from './clock.js'
import { showDuration } from './durations.js'
import { el, outcomeText, setConnection, setStatus } from './page.js'

const RECONNECT_MIN_MS = 200
const RECONNECT_MAX_MS = 3000
// The gateway sends a heartbeat after --heartbeat-interval-ms of silence (15 s unless set), so
// a socket silent for three of those is a dead link that TCP has not noticed (a sleeping laptop,
// a dropped NAT entry): drop it and resume, rather than wait forever for output that cannot
// arrive. Never sooner than MIN_SILENCE_MS, so a short interval with a slow link or a
// throttled background tab does not reconnect a healthy stream.
const MIN_SILENCE_MS = 45_000
const HEARTBEATS_MISSED = 3
// setTimeout fires at once for longer delays (the interval may be up to a day).
const MAX_TIMER_MS = 2 ** 31 - 1

function silenceFor (heartbeatIntervalMs) {
  if (!Number.isFinite(heartbeatIntervalMs) || heartbeatIntervalMs <= 0) return MIN_SILENCE_MS
  return Math.min(MAX_TIMER_MS, Math.max(MIN_SILENCE_MS, HEARTBEATS_MISSED * heartbeatIntervalMs))
}

export class Viewer {
  // One attachment at a time: the exec on screen, the bytes of each stream already written to the
  // terminal (the offsets a reconnect resumes from, so nothing is shown twice), and its socket.
  #current
  #api
  #screen
  #errors
  #onFinished
  // Until the gateway says its interval: right for its default.
  #silenceMs = MIN_SILENCE_MS

  // onFinished: called when the exec on screen ends, so the lists can show it.
  constructor ({ api, screen, errors, onFinished }) {
    this.#api = api
    this.#screen = screen
    this.#errors = errors
    this.#onFinished = onFinished
    el.connection.dataset.silenceMs = String(this.#silenceMs)
    screen.term.onData((data) => {
      const a = this.#current
      // Keystrokes are stdin only for an exec that reads it from a terminal; elsewhere they would
      // be refused by the gateway (and close the socket).
      if (a !== undefined && a.tty && a.interactive && !a.final) this.#sendFrame(a, { type: 'stdin', data })
    })
    screen.term.onResize(({ cols, rows }) => {
      const a = this.#current
      if (a !== undefined && a.tty && !a.final) this.#sendFrame(a, { type: 'resize', cols, rows })
    })
  }

  get current () { return this.#current }

  get silenceMs () { return this.#silenceMs }

  // The gateway's announced heartbeat interval (the page may attach before it is known).
  heartbeatEvery (ms) {
    this.#silenceMs = silenceFor(ms)
    el.connection.dataset.heartbeatMs = String(ms)
    el.connection.dataset.silenceMs = String(this.#silenceMs)
    const a = this.#current
    if (a !== undefined && a.ws !== undefined && !a.final) this.#armWatchdog(a)
  }

  attach (exec) {
    this.detach()
    this.#errors.clear()
    this.#screen.start({ tty: exec.tty })
    this.#current = {
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
    showDuration(el.duration, exec)
    if (exec.tty) this.#screen.fit()
    this.#connect(this.#current)
    if (exec.tty && exec.interactive) this.#screen.term.focus()
  }

  detach () {
    const a = this.#current
    this.#current = undefined
    if (a === undefined) return
    clearTimeout(a.timer)
    this.#abandon(a)
    setConnection('idle', '')
    el.kill.disabled = true
  }

  // Closes the socket without waiting for its close handshake, which a dead link never completes.
  #abandon (a) {
    clearTimeout(a.watchdog)
    const ws = a.ws
    a.ws = undefined
    if (ws === undefined) return
    ws.onopen = ws.onmessage = ws.onclose = null
    ws.close(1000, 'detached')
  }

  #armWatchdog (a) {
    clearTimeout(a.watchdog)
    a.watchdog = setTimeout(() => {
      if (a !== this.#current || a.final) return
      this.#abandon(a)
      this.#scheduleReconnect(a)
    }, this.#silenceMs)
  }

  #connect (a) {
    const ws = this.#api.openStream(a.id, a.stdoutSeen, a.stderrSeen)
    a.ws = ws
    setConnection(a.reconnects === 0 ? 'connecting' : 'reconnecting', a.reconnects === 0 ? 'connecting…' : 'reconnecting…')
    this.#armWatchdog(a)
    ws.onopen = () => {
      setConnection('open', a.reconnects === 0 ? 'live' : `live (reconnected ${a.reconnects}×)`)
      // The window may have changed size while the socket was down.
      if (a.tty && !a.final) this.#sendFrame(a, { type: 'resize', cols: this.#screen.term.cols, rows: this.#screen.term.rows })
    }
    ws.onmessage = (m) => {
      a.failures = 0
      this.#armWatchdog(a)
      if (typeof m.data === 'string') this.#onEvent(a, JSON.parse(m.data))
      else this.#onOutput(a, new Uint8Array(m.data))
    }
    ws.onclose = () => {
      if (a !== this.#current) return
      clearTimeout(a.watchdog)
      a.ws = undefined
      if (a.final) { setConnection('closed', 'ended'); return }
      // Dropped before the final event: the exec goes on without us; resume where we stopped.
      this.#scheduleReconnect(a)
    }
  }

  #scheduleReconnect (a) {
    a.failures++
    const delay = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** (a.failures - 1))
    setConnection('reconnecting', `connection lost; reconnecting in ${(delay / 1000).toFixed(1)} s…`)
    a.timer = setTimeout(() => { void this.#reconnect(a) }, delay)
  }

  async #reconnect (a) {
    if (a !== this.#current) return
    // A WebSocket that fails says nothing about why; the exec's own URL does (404 when it is gone,
    // 401 when the token no longer works).
    try {
      await this.#api.call('GET', `v1/execs/${encodeURIComponent(a.id)}`)
    } catch (err) {
      if (a !== this.#current) return
      if (err.status === 404 || err.status === 401 || err.status === 403) {
        a.final = true
        setStatus('failed', err.short)
        setConnection('closed', 'gave up')
        this.#errors.show(`exec ${a.id}`, err)
        return
      }
      this.#scheduleReconnect(a)
      return
    }
    if (a !== this.#current) return
    a.reconnects++
    el.connection.dataset.reconnects = String(a.reconnects)
    this.#connect(a)
  }

  #onOutput (a, frame) {
    // Output means the command has started, whatever the last poll said.
    if (el.status.dataset.state === 'pending') setStatus('running', 'running')
    const channel = frame[0]
    const bytes = frame.subarray(1)
    if (channel === 1) {
      a.stdoutSeen += bytes.length
      this.#screen.output('stdout', bytes)
    } else if (channel === 2) {
      a.stderrSeen += bytes.length
      this.#screen.output('stderr', bytes)
    }
  }

  #onEvent (a, ev) {
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
        this.#onOutput(a, frame)
        return
      }
      case 'gap':
        this.#screen.flushOutput([ev.stream])
        this.#screen.term.write(`\r\n\x1b[33m[${ev.to - ev.from} bytes of ${ev.stream} were no longer held]\x1b[0m\r\n`)
        if (ev.stream === 'stdout') a.stdoutSeen = Math.max(a.stdoutSeen, ev.to)
        else a.stderrSeen = Math.max(a.stderrSeen, ev.to)
        return
      case 'heartbeat':
        return
      case 'relay':
        // The exec runs on in its sandbox while the gateway reattaches; output resumes, no gap.
        if (ev.state === 'lost') setConnection('reconnecting', 'reconnecting to the sandbox…')
        else setConnection('open', a.reconnects === 0 ? 'live' : `live (reconnected ${a.reconnects}×)`)
        return
      case 'exit':
        a.final = true
        setStatus('exited', outcomeText(ev), ev.exitCode === 0 && ev.signal === null && !ev.timedOut)
        this.#finished(a)
        return
      case 'error':
        a.final = true
        setStatus('failed', `${ev.status} ${ev.code}`)
        this.#errors.show(`exec ${a.id}`, new ApiError(ev.status, ev.code, ev.message))
        this.#finished(a)
    }
  }

  #finished (a) {
    clearTimeout(a.watchdog)
    el.kill.disabled = true
    setConnection('closed', 'ended')
    // Stopped now; the record's endedAt replaces this at the next poll, which onFinished asks for.
    if (el.duration.dataset.running === 'true') showDuration(el.duration, { startedAt: el.duration.dataset.startedAt, endedAt: new Date(serverNow()).toISOString() })
    this.#screen.flushOutput()
    void this.#screen.flushed()
    this.#onFinished()
    if (a.tty) this.#screen.term.blur()
  }

  #sendFrame (a, frame) {
    if (a.ws === undefined || a.ws.readyState !== WebSocket.OPEN) return false
    a.ws.send(JSON.stringify(frame))
    return true
  }
}
