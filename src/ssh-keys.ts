import ssh2 from 'ssh2'

const { utils } = ssh2

export interface KeyPair {
  /** OpenSSH private key. */
  private: string
  /** OpenSSH one-line public key. */
  public: string
}

/**
 * `utils.generateKeyPairSync('ed25519')`, minus its 1-in-256 broken key: ssh2 1.17.0 strips
 * every leading zero byte of the public key (it means to strip only the DER BIT STRING's
 * unused-bits byte), so a key whose first byte is 0 comes out 31 bytes long and its own
 * `parseKey` rejects both halves as malformed (mscdex/ssh2#1390, #1513). A fresh key has the
 * same odds again, so a few tries make failure practically impossible.
 */
export function generateEd25519KeyPair (): KeyPair {
  for (let attempt = 0; attempt < 16; attempt++) {
    const pair = utils.generateKeyPairSync('ed25519')
    if (!(utils.parseKey(pair.public) instanceof Error) && !(utils.parseKey(pair.private) instanceof Error)) {
      return { private: pair.private, public: pair.public }
    }
  }
  throw new Error('could not generate a well-formed ed25519 key pair')
}

export interface HostKey {
  privateKey: string | Buffer
  /** OpenSSH one-line public key. */
  publicKey: string
}

/** Validates the given private host key, or generates an ed25519 one, and derives its public key. */
export function loadHostKey (hostKey: string | Buffer | undefined): HostKey {
  const privateKey = hostKey ?? generateEd25519KeyPair().private
  const parsed = utils.parseKey(privateKey)
  if (parsed instanceof Error) throw new Error(`hostKey is not a valid private key: ${parsed.message}`)
  // A multi-key OpenSSH file parses to an array at runtime; ssh2's Server uses the first key too.
  const key = Array.isArray(parsed) ? parsed[0] : parsed
  if (key === undefined || !key.isPrivateKey()) throw new Error('hostKey must be a private key')
  return { privateKey, publicKey: `${key.type} ${key.getPublicSSH().toString('base64')}` }
}
