// How long each exec ran, or has been running: from the gateway's startedAt and endedAt, written
// into .duration elements (the recent list's and the exec bar's), the running ones counted up.
import { serverNow } from './clock.js'

const TICK_MS = 1000

function formatDuration (ms, running) {
  if (ms < 1000 && !running) return `${Math.round(ms)} ms`
  const s = ms / 1000
  // Whole seconds while it counts up, so the figure does not flicker between ticks.
  if (s < 60) return running ? `${Math.floor(s)} s` : `${(Math.floor(s * 10) / 10).toFixed(1)} s`
  const min = Math.floor(s / 60)
  if (min < 60) return `${min} min ${String(Math.floor(s % 60)).padStart(2, '0')} s`
  return `${Math.floor(min / 60)} h ${String(min % 60).padStart(2, '0')} min`
}

const clockTime = (ms) => new Date(ms).toLocaleTimeString()

function render (elem) {
  const started = Date.parse(elem.dataset.startedAt)
  const ended = Date.parse(elem.dataset.endedAt)
  if (Number.isNaN(started)) {
    // Never started (still pending, or failed before the command ran): no duration to show.
    elem.textContent = ''
    elem.title = ''
  } else if (Number.isNaN(ended)) {
    elem.textContent = formatDuration(Math.max(0, serverNow() - started), true)
    elem.title = `running since ${clockTime(started)}`
  } else {
    elem.textContent = formatDuration(Math.max(0, ended - started), false)
    elem.title = `${clockTime(started)} → ${clockTime(ended)}`
  }
}

// From an exec record (null or absent: not yet).
export function showDuration (elem, { startedAt, endedAt }) {
  elem.dataset.startedAt = startedAt ?? ''
  elem.dataset.endedAt = endedAt ?? ''
  elem.dataset.running = String(elem.dataset.startedAt !== '' && elem.dataset.endedAt === '')
  render(elem)
}

export function startTicking () {
  setInterval(() => {
    for (const elem of document.querySelectorAll('.duration[data-running="true"]')) render(elem)
  }, TICK_MS)
}
