// src/config.ts (flags, environment, defaults, listen safety) and src/tokens.ts (supervisor
// tokens and API bearer tokens).
import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import {
  ConfigError, envName, isLoopbackHost, loadServeConfig, parseFlags, parseHostPort, serveFlags, type FlagSpec
} from '../../src/config.js'
import { matchesApiToken, signSupervisorToken, verifySupervisorToken } from '../../src/tokens.js'

function configError (fn: () => unknown): ConfigError {
  try {
    fn()
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError)
    return err as ConfigError
  }
  throw new Error('expected a ConfigError, nothing was thrown')
}

// A valid, non-default value for every flag, as text.
function sampleValue (spec: FlagSpec): string {
  if (spec.name === 'listen') return '127.0.0.1:18080'
  if (spec.name === 'supervisor-listen') return '127.0.0.1:18081'
  if (spec.kind === 'bool') return 'true'
  if (spec.kind === 'int') {
    const def = spec.default as number
    const max = spec.max ?? Number.MAX_SAFE_INTEGER
    return String(def + 1 <= max ? def + 1 : def - 1)
  }
  return `sample-${spec.name}`
}

function convertedSample (spec: FlagSpec): unknown {
  const v = sampleValue(spec)
  if (spec.kind === 'bool') return true
  if (spec.kind === 'int') return Number(v)
  return v
}

describe('envName', () => {
  it('is EXEC_GATEWAY_ + upper snake case', () => {
    expect(envName('listen')).toBe('EXEC_GATEWAY_LISTEN')
    expect(envName('supervisor-listen')).toBe('EXEC_GATEWAY_SUPERVISOR_LISTEN')
    expect(envName('ssh-keepalive-count-max')).toBe('EXEC_GATEWAY_SSH_KEEPALIVE_COUNT_MAX')
    expect(envName('api-token')).toBe('EXEC_GATEWAY_API_TOKEN')
    expect(envName('exec-ttl-s')).toBe('EXEC_GATEWAY_EXEC_TTL_S')
  })
})

describe('serve flags: the contract table', () => {
  const DOCUMENTED_DEFAULTS: Record<string, string | number | boolean | undefined> = {
    listen: '127.0.0.1:8080',
    'supervisor-listen': '127.0.0.1:8081',
    'data-dir': './.exec-gateway',
    'api-token': undefined,
    'local-sandbox': false,
    'session-wait-ms': 15000,
    'relay-open-timeout-ms': 10000,
    'ssh-ready-timeout-ms': 10000,
    'ssh-keepalive-interval-ms': 15000,
    'ssh-keepalive-count-max': 4,
    'h2-ping-interval-ms': 20000,
    'h2-ping-timeout-ms': 10000,
    'close-wait-ms': 500,
    'retention-bytes': 8388608,
    'exec-ttl-s': 3600
  }

  it('every contract flag exists with its contract default', () => {
    const { flags } = parseFlags(serveFlags, [], {})
    const byName = new Map<string, FlagSpec>(serveFlags.map((f) => [f.name, f]))
    for (const [name, def] of Object.entries(DOCUMENTED_DEFAULTS)) {
      const spec = byName.get(name)
      expect(spec, `--${name}`).toBeDefined()
      expect((flags as Record<string, unknown>)[spec!.key], `--${name} default`).toBe(def)
    }
  })

  it('defaults give a loopback config', () => {
    const c = loadServeConfig([], {})
    expect(c.listen).toEqual({ host: '127.0.0.1', port: 8080 })
    expect(c.supervisorListen).toEqual({ host: '127.0.0.1', port: 8081 })
    expect(c.apiTokens).toEqual([])
    expect(c.localSandbox).toBe(false)
    expect(c.retentionBytes).toBe(8388608)
    expect(Object.isFrozen(c)).toBe(true)
  })

  it.each(serveFlags.map((f) => [f.name, f] as const))('--%s is read from its EXEC_GATEWAY_* variable', (name, spec) => {
    const env = { [envName(name)]: sampleValue(spec) }
    const { flags } = parseFlags(serveFlags, [], env)
    expect((flags as Record<string, unknown>)[spec.key]).toEqual(convertedSample(spec))
  })

  it.each(serveFlags.map((f) => [f.name, f] as const))('--%s on the command line beats its variable', (name, spec) => {
    const env = { [envName(name)]: sampleValue(spec) }
    const argv = spec.kind === 'bool' ? [`--${name}=false`] : [`--${name}`, spec.name === 'listen' || spec.name === 'supervisor-listen' ? '127.0.0.1:1' : spec.kind === 'int' ? String(spec.min ?? 0) : 'from-flag']
    const { flags } = parseFlags(serveFlags, argv, env)
    const want = spec.kind === 'bool' ? false : spec.kind === 'int' ? (spec.min ?? 0) : argv[1]
    expect((flags as Record<string, unknown>)[spec.key]).toEqual(want)
  })

  it('flag beats env beats default', () => {
    expect(loadServeConfig([], {}).closeWaitMs).toBe(500)
    expect(loadServeConfig([], { EXEC_GATEWAY_CLOSE_WAIT_MS: '700' }).closeWaitMs).toBe(700)
    expect(loadServeConfig(['--close-wait-ms', '900'], { EXEC_GATEWAY_CLOSE_WAIT_MS: '700' }).closeWaitMs).toBe(900)
    expect(loadServeConfig(['--close-wait-ms=901'], { EXEC_GATEWAY_CLOSE_WAIT_MS: '700' }).closeWaitMs).toBe(901)
  })

  it('an empty variable counts as unset', () => {
    expect(loadServeConfig([], { EXEC_GATEWAY_CLOSE_WAIT_MS: '' }).closeWaitMs).toBe(500)
    expect(loadServeConfig([], { EXEC_GATEWAY_LISTEN: '' }).listen).toEqual({ host: '127.0.0.1', port: 8080 })
  })

  it('--flag=value and --flag value are the same', () => {
    const a = loadServeConfig(['--listen=127.0.0.1:0', '--retention-bytes=2048', '--data-dir=/tmp/x=y'], {})
    const b = loadServeConfig(['--listen', '127.0.0.1:0', '--retention-bytes', '2048', '--data-dir', '/tmp/x=y'], {})
    expect(a).toEqual(b)
    expect(a.listen).toEqual({ host: '127.0.0.1', port: 0 })
    expect(a.retentionBytes).toBe(2048)
    expect(a.dataDir).toBe('/tmp/x=y')
  })

  it('bool flags: bare, =true/=false/=1/=0, and from the environment', () => {
    expect(loadServeConfig(['--local-sandbox'], {}).localSandbox).toBe(true)
    expect(loadServeConfig(['--local-sandbox=true'], {}).localSandbox).toBe(true)
    expect(loadServeConfig(['--local-sandbox=1'], {}).localSandbox).toBe(true)
    expect(loadServeConfig(['--local-sandbox=false'], { EXEC_GATEWAY_LOCAL_SANDBOX: 'true' }).localSandbox).toBe(false)
    expect(loadServeConfig(['--local-sandbox=0'], {}).localSandbox).toBe(false)
    expect(loadServeConfig([], { EXEC_GATEWAY_LOCAL_SANDBOX: '1' }).localSandbox).toBe(true)
    expect(configError(() => loadServeConfig(['--local-sandbox=yes'], {})).message).toMatch(/--local-sandbox/)
    expect(configError(() => loadServeConfig([], { EXEC_GATEWAY_LOCAL_SANDBOX: 'maybe' })).message).toMatch(/EXEC_GATEWAY_LOCAL_SANDBOX/)
  })

  it('a bare bool flag does not swallow the next flag', () => {
    const c = loadServeConfig(['--local-sandbox', '--close-wait-ms', '1'], {})
    expect(c.localSandbox).toBe(true)
    expect(c.closeWaitMs).toBe(1)
  })
})

describe('serve flags: validation', () => {
  it.each([
    [['--close-wait-ms', '1.5'], /--close-wait-ms/],
    [['--close-wait-ms', 'abc'], /--close-wait-ms/],
    [['--close-wait-ms', '1e3'], /--close-wait-ms/],
    [['--close-wait-ms', ''], /--close-wait-ms/],
    [['--close-wait-ms', '-1'], /--close-wait-ms.*at least 0/],
    [['--relay-open-timeout-ms', '0'], /--relay-open-timeout-ms.*at least 1/],
    [['--retention-bytes', '1023'], /--retention-bytes.*at least 1024/],
    [['--ssh-keepalive-count-max', '0'], /--ssh-keepalive-count-max/],
    [['--exec-ttl-s', '99999999999999999999'], /--exec-ttl-s.*at most/],
    [['--session-wait-ms=ten'], /--session-wait-ms/]
  ])('%j → ConfigError naming the flag', (argv, pattern) => {
    expect(configError(() => loadServeConfig(argv, {})).message).toMatch(pattern)
  })

  it('a bad value in the environment names the variable', () => {
    expect(configError(() => loadServeConfig([], { EXEC_GATEWAY_CLOSE_WAIT_MS: '5s' })).message).toMatch(/EXEC_GATEWAY_CLOSE_WAIT_MS/)
    expect(configError(() => loadServeConfig([], { EXEC_GATEWAY_H2_PING_TIMEOUT_MS: '0' })).message).toMatch(/EXEC_GATEWAY_H2_PING_TIMEOUT_MS/)
  })

  it('the minimum itself is accepted', () => {
    expect(loadServeConfig(['--close-wait-ms', '0'], {}).closeWaitMs).toBe(0)
    expect(loadServeConfig(['--retention-bytes', '1024'], {}).retentionBytes).toBe(1024)
  })

  it('unknown flag → ConfigError', () => {
    expect(configError(() => loadServeConfig(['--no-such-flag'], {})).message).toMatch(/--no-such-flag/)
    expect(configError(() => loadServeConfig(['--listen-addr=1'], {})).message).toMatch(/unknown flag/)
  })

  it('a flag without its value → ConfigError', () => {
    expect(configError(() => loadServeConfig(['--listen'], {})).message).toMatch(/--listen/)
  })

  it('positional arguments are refused', () => {
    expect(configError(() => loadServeConfig(['extra'], {})).message).toMatch(/extra/)
  })

  it('bad listen addresses', () => {
    expect(configError(() => loadServeConfig(['--listen', 'nohost'], {})).message).toMatch(/--listen/)
    expect(configError(() => loadServeConfig(['--listen', '127.0.0.1:65536'], {})).message).toMatch(/--listen/)
    expect(configError(() => loadServeConfig(['--supervisor-listen', ':8081'], {})).message).toMatch(/--supervisor-listen/)
  })
})

describe('listen safety', () => {
  it('a non-loopback --listen without --api-token is refused, naming --api-token', () => {
    for (const listen of ['0.0.0.0:0', '[::]:8080', '10.1.2.3:80', 'example.com:80']) {
      expect(configError(() => loadServeConfig(['--listen', listen], {})).message, listen).toMatch(/--api-token/)
    }
  })

  it('blank tokens do not count', () => {
    expect(configError(() => loadServeConfig(['--listen', '0.0.0.0:0', '--api-token', ' , ,'], {})).message).toMatch(/--api-token/)
  })

  it('allowed with a token, from the flag or the environment', () => {
    expect(loadServeConfig(['--listen', '0.0.0.0:0', '--api-token', 's3cret'], {}).apiTokens).toEqual(['s3cret'])
    expect(loadServeConfig(['--listen', '0.0.0.0:0'], { EXEC_GATEWAY_API_TOKEN: 'a, b ,c' }).apiTokens).toEqual(['a', 'b', 'c'])
  })

  it('loopback listens need no token', () => {
    for (const listen of ['127.0.0.1:0', 'localhost:9000', '[::1]:0', '127.10.20.30:1']) {
      expect(() => loadServeConfig(['--listen', listen], {}), listen).not.toThrow()
    }
  })

  it('the supervisor listener may be anything (it checks supervisor tokens)', () => {
    expect(loadServeConfig(['--supervisor-listen', '0.0.0.0:0'], {}).supervisorListen).toEqual({ host: '0.0.0.0', port: 0 })
  })
})

describe('parseHostPort / isLoopbackHost', () => {
  it('parses host:port and [v6]:port', () => {
    expect(parseHostPort('127.0.0.1:8080', 'x')).toEqual({ host: '127.0.0.1', port: 8080 })
    expect(parseHostPort('[::1]:0', 'x')).toEqual({ host: '::1', port: 0 })
    expect(parseHostPort('[fe80::1%eth0]:22', 'x')).toEqual({ host: 'fe80::1%eth0', port: 22 })
    expect(parseHostPort('localhost:65535', 'x')).toEqual({ host: 'localhost', port: 65535 })
  })

  it('refuses the rest, naming what it parsed', () => {
    for (const v of ['', '8080', 'host', 'host:', ':80', '::1:80', 'host:-1', 'host:80x', 'host:65536', '[::1]', '[::1]80']) {
      expect(configError(() => parseHostPort(v, '--what')).message, v).toMatch(/--what/)
    }
  })

  it('loopback names and addresses', () => {
    for (const h of ['localhost', 'LOCALHOST', '127.0.0.1', '127.255.0.9', '::1', '[::1]', '::ffff:127.0.0.1']) {
      expect(isLoopbackHost(h), h).toBe(true)
    }
    for (const h of ['0.0.0.0', '::', '10.0.0.1', '192.168.1.1', 'example.com', '127.0.0.1.evil.example', 'localhost.evil.example', '', '128.0.0.1']) {
      expect(isLoopbackHost(h), h).toBe(false)
    }
  })
})

// ---- tokens ---------------------------------------------------------------------------------

describe('supervisor tokens', () => {
  const secret = randomBytes(32)

  it('sign → verify round trip', () => {
    const t = signSupervisorToken(secret, 'sbx-1')
    expect(t.startsWith('egw1.')).toBe(true)
    expect(t.split('.')).toHaveLength(4)
    expect(verifySupervisorToken([secret], t)).toEqual({ ok: true, sandboxId: 'sbx-1' })
  })

  it('sandbox ids with dots, dashes and underscores round trip', () => {
    for (const id of ['a', 'A.b-c_d', '0' + 'x'.repeat(127), 'my.sandbox.example']) {
      expect(verifySupervisorToken([secret], signSupervisorToken(secret, id))).toEqual({ ok: true, sandboxId: id })
    }
  })

  it('refuses to sign an invalid sandbox id', () => {
    for (const id of ['', 'bad id!', '-lead', '.lead', 'x'.repeat(129), 'a/b', 'a\nb']) {
      expect(() => signSupervisorToken(secret, id), JSON.stringify(id)).toThrow(TypeError)
    }
  })

  it('wrong secret → bad signature', () => {
    const t = signSupervisorToken(secret, 'sbx-1')
    expect(verifySupervisorToken([randomBytes(32)], t)).toEqual({ ok: false, reason: 'bad signature' })
    expect(verifySupervisorToken([], t).ok).toBe(false)
  })

  it('a tampered sandbox id → refused', () => {
    const parts = signSupervisorToken(secret, 'sbx-1').split('.')
    parts[1] = Buffer.from('sbx-2').toString('base64url')
    const r = verifySupervisorToken([secret], parts.join('.'))
    expect(r.ok).toBe(false)
    if (!r.ok) expect(r.reason).toMatch(/signature/)
  })

  it('a tampered expiry → refused', () => {
    const parts = signSupervisorToken(secret, 'sbx-1', 1000).split('.')
    parts[2] = '0'
    expect(verifySupervisorToken([secret], parts.join('.'))).toEqual({ ok: false, reason: 'bad signature' })
  })

  it('a tampered mac → refused', () => {
    const t = signSupervisorToken(secret, 'sbx-1')
    const last = t.at(-1) === 'A' ? 'B' : 'A'
    expect(verifySupervisorToken([secret], t.slice(0, -1) + last).ok).toBe(false)
    expect(verifySupervisorToken([secret], t.slice(0, -4)).ok).toBe(false)
  })

  it('expiry: valid before, refused after, with a reason', () => {
    const now = 1_700_000_000
    const t = signSupervisorToken(secret, 'sbx-1', now + 60)
    expect(verifySupervisorToken([secret], t, now)).toEqual({ ok: true, sandboxId: 'sbx-1' })
    expect(verifySupervisorToken([secret], t, now + 60)).toEqual({ ok: true, sandboxId: 'sbx-1' })
    expect(verifySupervisorToken([secret], t, now + 61)).toEqual({ ok: false, reason: 'token expired' })
    const past = signSupervisorToken(secret, 'sbx-1', Math.floor(Date.now() / 1000) - 10)
    expect(verifySupervisorToken([secret], past)).toEqual({ ok: false, reason: 'token expired' })
  })

  it('malformed tokens → malformed token', () => {
    const good = signSupervisorToken(secret, 'sbx-1')
    const [, id, exp, mac] = good.split('.')
    for (const t of [
      '', 'garbage', 'egw1', 'egw1.a.b', `egw2.${id}.${exp}.${mac}`, `${good}.extra`,
      `egw1.${Buffer.from('bad id!').toString('base64url')}.0.${mac}`,
      `egw1.${id}.-5.${mac}`, `egw1.${id}.1.5.${mac}`, `egw1.${id}.abc.${mac}`, `egw1..0.${mac}`
    ]) {
      const r = verifySupervisorToken([secret], t)
      expect(r.ok, JSON.stringify(t)).toBe(false)
      if (!r.ok) expect(r.reason.length).toBeGreaterThan(0)
    }
    expect(verifySupervisorToken([secret], 'garbage')).toEqual({ ok: false, reason: 'malformed token' })
  })

  it('a rotated secret list verifies tokens from either secret', () => {
    const oldSecret = randomBytes(32)
    const newSecret = randomBytes(32)
    const oldToken = signSupervisorToken(oldSecret, 'sbx-old')
    const newToken = signSupervisorToken(newSecret, 'sbx-new')
    expect(verifySupervisorToken([newSecret, oldSecret], oldToken)).toEqual({ ok: true, sandboxId: 'sbx-old' })
    expect(verifySupervisorToken([newSecret, oldSecret], newToken)).toEqual({ ok: true, sandboxId: 'sbx-new' })
    expect(verifySupervisorToken([newSecret], oldToken).ok).toBe(false)
  })

  it('a token speaks for one sandbox only', () => {
    const a = signSupervisorToken(secret, 'sbx-a')
    const b = signSupervisorToken(secret, 'sbx-b')
    expect(a).not.toBe(b)
    expect(verifySupervisorToken([secret], a)).toEqual({ ok: true, sandboxId: 'sbx-a' })
  })
})

describe('matchesApiToken', () => {
  it('matches any configured token, exactly', () => {
    expect(matchesApiToken(['alpha', 'beta'], 'alpha')).toBe(true)
    expect(matchesApiToken(['alpha', 'beta'], 'beta')).toBe(true)
    expect(matchesApiToken(['alpha', 'beta'], 'gamma')).toBe(false)
    expect(matchesApiToken(['alpha'], 'alph')).toBe(false)
    expect(matchesApiToken(['alpha'], 'alphaa')).toBe(false)
    expect(matchesApiToken(['alpha'], 'ALPHA')).toBe(false)
    expect(matchesApiToken(['alpha'], '')).toBe(false)
    expect(matchesApiToken([], 'alpha')).toBe(false)
    expect(matchesApiToken([], '')).toBe(false)
  })

  it('works with tokens of very different lengths and non-ASCII text', () => {
    const long = 'x'.repeat(10_000)
    expect(matchesApiToken([long], long)).toBe(true)
    expect(matchesApiToken([long], 'x')).toBe(false)
    expect(matchesApiToken(['pässwörd😀'], 'pässwörd😀')).toBe(true)
  })
})
