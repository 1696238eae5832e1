/**
 * The box's SSH host key: ed25519, generated once into the state directory and reused ever after, so users can pin
 * its fingerprint. Survives the store wipe at every start.
 */
import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import ssh2 from 'ssh2';

const { utils } = ssh2; // ssh2 is CommonJS: named imports do not work under plain Node ESM

export interface HostKey {
  /** OpenSSH private key text, for the SSH server. */
  privateKey: string;
  /** `ssh-ed25519 AAAA…` */
  publicKey: string;
  /** `SHA256:…` as `ssh-keygen -l` prints it. */
  fingerprint: string;
  path: string;
}

export const HOST_KEY_FILE = 'ssh_host_ed25519_key';

/** OpenSSH fingerprint of a public key blob: SHA256 + unpadded base64. */
export function fingerprintOfBlob(blob: Buffer): string {
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

export function publicKeyBlob(publicKeyLine: string): Buffer {
  const b64 = publicKeyLine.trim().split(/\s+/)[1];
  if (!b64) throw new Error(`not an OpenSSH public key: ${publicKeyLine.slice(0, 40)}`);
  return Buffer.from(b64, 'base64');
}

/** Load the host key from `stateDir`, generating it on first start. */
export function loadOrCreateHostKey(stateDir: string): HostKey {
  mkdirSync(stateDir, { recursive: true, mode: 0o755 });
  const path = join(stateDir, HOST_KEY_FILE);
  if (!existsSync(path)) {
    const pair = utils.generateKeyPairSync('ed25519', { comment: 'buildbox host key' });
    const tmp = `${path}.tmp-${process.pid}`;
    writeFileSync(tmp, pair.private, { mode: 0o600 });
    writeFileSync(`${path}.pub`, `${pair.public.trim()}\n`, { mode: 0o644 });
    renameSync(tmp, path);
  }
  chmodSync(path, 0o600);
  const privateKey = readFileSync(path, 'utf8');
  const parsed = utils.parseKey(privateKey);
  if (parsed instanceof Error) throw new Error(`host key ${path} is unreadable: ${parsed.message}`);
  const key = Array.isArray(parsed) ? parsed[0]! : parsed;
  const blob = key.getPublicSSH();
  const publicKey = `${key.type} ${blob.toString('base64')}`;
  return { privateKey, publicKey, fingerprint: fingerprintOfBlob(blob), path };
}

/** The `known_hosts` line for this box as clients will reach it. */
export function knownHostsLine(hostKey: HostKey, host: string, port: number): string {
  const pattern = port === 22 ? host : `[${host}]:${port}`;
  return `${pattern} ${hostKey.publicKey}`;
}
