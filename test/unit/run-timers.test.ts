import { describe, expect, it } from 'vitest'
import { RunTimers } from '../../src/execs/run-timers.js'
import { sleep } from '../helpers/wait.js'

describe('RunTimers', () => {
  it('fires an armed timer once and forgets it', async () => {
    const t = new RunTimers()
    let fired = 0
    t.arm('timeout', 10, () => { fired++ })
    expect(t.armed).toBe(1)
    await sleep(40)
    expect(fired).toBe(1)
    expect(t.armed).toBe(0)
  })

  it('re-arming a name replaces the earlier timer', async () => {
    const t = new RunTimers()
    const fired: string[] = []
    t.arm('killBound', 10, () => fired.push('first'))
    t.arm('killBound', 20, () => fired.push('second'))
    expect(t.armed).toBe(1)
    await sleep(50)
    expect(fired).toEqual(['second'])
  })

  it('dispose clears every timer, and a timer armed afterwards (a late await) is never armed', async () => {
    const t = new RunTimers()
    let fired = 0
    t.arm('timeout', 10, () => { fired++ })
    t.arm('killBound', 10, () => { fired++ })
    t.dispose()
    t.dispose()
    expect(t.disposed).toBe(true)
    t.arm('killBound', 1, () => { fired++ })
    expect(t.armed).toBe(0)
    await sleep(40)
    expect(fired).toBe(0)
  })
})
