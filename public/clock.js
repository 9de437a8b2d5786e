// The gateway's clock, as near as the page can tell. Exec times are the gateway's, so a browser
// whose clock is off by minutes would show a running exec's elapsed time off by as much; each
// API answer's Date header bounds the difference.

// Added to Date.now() to get the gateway's time.
let offsetMs = 0

export function noteServerDate (header, sentAt, receivedAt) {
  const date = Date.parse(header ?? '')
  if (Number.isNaN(date)) return
  // The header has whole seconds: the gateway read its clock, somewhere in [date, date + 1 s),
  // while the request was out. The offset moves only as far as it must to fit that.
  const lowest = date - receivedAt
  const highest = date + 1000 - sentAt
  offsetMs = Math.min(highest, Math.max(lowest, offsetMs))
}

export function serverNow () {
  return Date.now() + offsetMs
}
