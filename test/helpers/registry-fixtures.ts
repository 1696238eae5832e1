/**
 * Shared fixtures for the registry tests: real keys made by ssh-keygen at test time, hand-made security-key blobs
 * (there is no FIDO token here), and helpers to lay out registry directories.
 */
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { run, tempDir } from './exec.js';

export interface KeyPair {
  /** The .pub line (with a comment). */
  pub: string;
  /** The private key file's text. */
  priv: string;
  file: string;
}

export interface TestKeys {
  ed: KeyPair[];
  ecdsa256: KeyPair;
  ecdsa384: KeyPair;
  ecdsa521: KeyPair;
  rsa1024: KeyPair;
  rsa3072: KeyPair;
  dsa: KeyPair;
  /** An RSA private key in PEM (`-----BEGIN RSA PRIVATE KEY-----`). */
  rsaPem: string;
  skEd: string;
  skEcdsa: string;
  dir: string;
  cleanup: () => void;
}

async function keygen(dir: string, name: string, args: string[], comment: string): Promise<KeyPair> {
  const file = join(dir, name);
  await run('ssh-keygen', ['-q', '-N', '', '-C', comment, '-f', file, ...args]);
  return {
    pub: readFileSync(`${file}.pub`, 'utf8').trim(),
    priv: readFileSync(file, 'utf8'),
    file,
  };
}

function sshString(b: Buffer | string): Buffer {
  const buf = typeof b === 'string' ? Buffer.from(b, 'latin1') : b;
  const len = Buffer.alloc(4);
  len.writeUInt32BE(buf.length);
  return Buffer.concat([len, buf]);
}

/** A security-key public key line, built by hand as OpenSSH encodes it. */
export function skLine(kind: 'ed25519' | 'ecdsa', comment: string): string {
  if (kind === 'ed25519') {
    const t = 'sk-ssh-ed25519@openssh.com';
    const blob = Buffer.concat([sshString(t), sshString(randomBytes(32)), sshString('ssh:')]);
    return `${t} ${blob.toString('base64')} ${comment}`;
  }
  const t = 'sk-ecdsa-sha2-nistp256@openssh.com';
  // A real curve point: ssh-keygen checks it.
  const jwk = generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).publicKey.export({ format: 'jwk' });
  const q = Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]);
  const blob = Buffer.concat([sshString(t), sshString('nistp256'), sshString(q), sshString('ssh:')]);
  return `${t} ${blob.toString('base64')} ${comment}`;
}

export function wireBlob(...parts: Array<Buffer | string>): Buffer {
  return Buffer.concat(parts.map(sshString));
}

export async function makeKeys(edCount = 8): Promise<TestKeys> {
  const t = tempDir('buildbox-keys-');
  const dir = t.path;
  const ed: KeyPair[] = [];
  for (let i = 0; i < edCount; i++) ed.push(await keygen(dir, `ed${i}`, ['-t', 'ed25519'], `user${i}@host`));
  const [ecdsa256, ecdsa384, ecdsa521, rsa1024, rsa3072, dsa, pem] = await Promise.all([
    keygen(dir, 'ec256', ['-t', 'ecdsa', '-b', '256'], 'ec256@host'),
    keygen(dir, 'ec384', ['-t', 'ecdsa', '-b', '384'], 'ec384@host'),
    keygen(dir, 'ec521', ['-t', 'ecdsa', '-b', '521'], 'ec521@host'),
    keygen(dir, 'rsa1024', ['-t', 'rsa', '-b', '1024'], 'rsa1024@host'),
    keygen(dir, 'rsa3072', ['-t', 'rsa', '-b', '3072'], 'rsa3072@host'),
    keygen(dir, 'dsa', ['-t', 'dsa'], 'dsa@host'),
    keygen(dir, 'pem', ['-t', 'rsa', '-b', '1024', '-m', 'PEM'], 'pem@host'),
  ]);
  return {
    ed,
    ecdsa256,
    ecdsa384,
    ecdsa521,
    rsa1024,
    rsa3072,
    dsa,
    rsaPem: pem.priv,
    skEd: skLine('ed25519', 'yubikey-a'),
    skEcdsa: skLine('ecdsa', 'yubikey-b'),
    dir,
    cleanup: t.cleanup,
  };
}

/** Fingerprint as ssh-keygen prints it for a one-line public key. */
export async function keygenFingerprint(pubLine: string, dir: string): Promise<string> {
  const f = join(dir, `fp-${randomBytes(4).toString('hex')}.pub`);
  writeFileSync(f, `${pubLine}\n`);
  const r = await run('ssh-keygen', ['-l', '-E', 'sha256', '-f', f]);
  return r.stdout.split(' ')[1]!;
}

/** Write files (relative path → content) under dir. */
export function writeTree(dir: string, files: Record<string, string | Buffer>): void {
  for (const [rel, content] of Object.entries(files)) {
    const p = join(dir, rel);
    mkdirSync(dirname(p), { recursive: true });
    writeFileSync(p, content);
  }
}
