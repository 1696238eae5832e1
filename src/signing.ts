/**
 * Nix ed25519 signing keys and path-info signatures (spec §5.6).
 *
 * Key text formats are those of `nix-store --generate-binary-cache-key`:
 * - secret key: `<name>:<base64 of 64 bytes = 32-byte seed ‖ 32-byte public key>`
 * - public key: `<name>:<base64 of 32 bytes>`
 * A signature is `<name>:<base64 of 64 bytes>` over the path-info fingerprint
 * `1;<storePath>;sha256:<nix32 narHash>;<narSize>;<comma-separated sorted reference paths>`.
 *
 * Everything is done with node:crypto: raw key bytes become KeyObjects through the fixed PKCS#8 / SPKI DER prefixes
 * for Ed25519 (RFC 8410).
 */
import {
  createPrivateKey,
  createPublicKey,
  sign as edSign,
  verify as edVerify,
  type KeyObject,
  randomBytes,
} from 'node:crypto';
import { chmodSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import type { Hash } from './hash.js';

export class SigningError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SigningError';
  }
}

/** DER header of a PKCS#8 Ed25519 private key; followed by the 32-byte seed. */
const PKCS8_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');
/** DER header of an SPKI Ed25519 public key; followed by the 32 raw public-key bytes. */
const SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

const SEED_BYTES = 32;
const PUBLIC_BYTES = 32;
const SECRET_BYTES = 64;
const SIGNATURE_BYTES = 64;

const BASE64_RE = /^[A-Za-z0-9+/]*={0,2}$/;

function decodeBase64Exact(s: string, size: number, what: string): Buffer {
  const b = BASE64_RE.test(s) ? Buffer.from(s, 'base64') : undefined;
  if (b === undefined || b.length !== size || b.toString('base64') !== s) {
    throw new SigningError(`${what} is not valid base64 of ${size} bytes`);
  }
  return b;
}

/** Split `name:base64`; the name must be non-empty (as in Nix). */
function splitKeyText(text: string, what: string): { name: string; data: string } {
  const t = text.trim();
  const colon = t.indexOf(':');
  if (colon <= 0) throw new SigningError(`${what} '${abbreviate(t)}' is not of the form '<name>:<base64>'`);
  return { name: t.slice(0, colon), data: t.slice(colon + 1) };
}

function abbreviate(s: string): string {
  return s.length > 40 ? `${s.slice(0, 20)}…` : s;
}

function publicKeyObject(raw: Buffer): KeyObject {
  return createPublicKey({ key: Buffer.concat([SPKI_PREFIX, raw]), format: 'der', type: 'spki' });
}

function privateKeyObject(seed: Buffer): KeyObject {
  return createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, seed]), format: 'der', type: 'pkcs8' });
}

/** Raw 32 public bytes of a private ed25519 KeyObject. */
function rawPublicOf(priv: KeyObject): Buffer {
  const der = createPublicKey(priv).export({ format: 'der', type: 'spki' });
  return Buffer.from(der.subarray(SPKI_PREFIX.length));
}

export class PublicKey {
  readonly keyObject: KeyObject;

  constructor(
    readonly name: string,
    /** The raw 32-byte ed25519 public key. */
    readonly raw: Buffer,
  ) {
    if (name === '' || name.includes(':')) throw new SigningError(`invalid key name '${name}'`);
    if (raw.length !== PUBLIC_BYTES) throw new SigningError(`an ed25519 public key must be ${PUBLIC_BYTES} bytes`);
    this.keyObject = publicKeyObject(raw);
  }

  /** Parse `name:base64(32 bytes)`. */
  static parse(text: string): PublicKey {
    const { name, data } = splitKeyText(text, 'public key');
    return new PublicKey(name, decodeBase64Exact(data, PUBLIC_BYTES, `public key '${name}'`));
  }

  toString(): string {
    return `${this.name}:${this.raw.toString('base64')}`;
  }

  /** Check one detached signature (raw 64 bytes) over `data`. */
  verifyRaw(data: Uint8Array | string, signature: Buffer): boolean {
    if (signature.length !== SIGNATURE_BYTES) return false;
    return edVerify(null, typeof data === 'string' ? Buffer.from(data) : data, this.keyObject, signature);
  }
}

export class SecretKey {
  readonly keyObject: KeyObject;
  readonly publicKey: PublicKey;

  private constructor(
    readonly name: string,
    /** The 32-byte seed. */
    private readonly seed: Buffer,
  ) {
    if (name === '' || name.includes(':')) throw new SigningError(`invalid key name '${name}'`);
    this.keyObject = privateKeyObject(seed);
    this.publicKey = new PublicKey(name, rawPublicOf(this.keyObject));
  }

  /** A fresh key, like `nix-store --generate-binary-cache-key <name>`. */
  static generate(name: string): SecretKey {
    return new SecretKey(name, randomBytes(SEED_BYTES));
  }

  /** Parse `name:base64(seed ‖ public)`; the public half must belong to the seed. */
  static parse(text: string): SecretKey {
    const { name, data } = splitKeyText(text, 'secret key');
    const bytes = decodeBase64Exact(data, SECRET_BYTES, `secret key '${name}'`);
    const key = new SecretKey(name, Buffer.from(bytes.subarray(0, SEED_BYTES)));
    if (!key.publicKey.raw.equals(bytes.subarray(SEED_BYTES))) {
      throw new SigningError(`secret key '${name}' is corrupt: its public half does not match its seed`);
    }
    return key;
  }

  /** `name:base64(seed ‖ public)`, the format Nix reads with `--key-file` / `secret-key-files`. */
  toString(): string {
    return `${this.name}:${Buffer.concat([this.seed, this.publicKey.raw]).toString('base64')}`;
  }

  /** Sign `data`, giving a Nix signature string `name:base64(64 bytes)`. */
  sign(data: Uint8Array | string): string {
    const sig = edSign(null, typeof data === 'string' ? Buffer.from(data) : data, this.keyObject);
    return `${this.name}:${sig.toString('base64')}`;
  }
}

/** Read a secret key file (as written by Nix or by `saveSecretKey`). */
export function loadSecretKey(file: string): SecretKey {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new SigningError(`cannot read secret key file '${file}': ${(e as Error).message}`);
  }
  try {
    return SecretKey.parse(text);
  } catch (e) {
    throw new SigningError(`secret key file '${file}': ${(e as Error).message}`);
  }
}

export function loadPublicKey(file: string): PublicKey {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new SigningError(`cannot read public key file '${file}': ${(e as Error).message}`);
  }
  try {
    return PublicKey.parse(text);
  } catch (e) {
    throw new SigningError(`public key file '${file}': ${(e as Error).message}`);
  }
}

/** Write atomically (temp file + rename) with the given mode; the file never exists with a wider mode. */
function writeFileAtomic(file: string, text: string, mode: number): void {
  const tmp = join(dirname(file), `.${basename(file)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  writeFileSync(tmp, text, { mode, flag: 'wx' });
  chmodSync(tmp, mode);
  renameSync(tmp, file);
}

/** Save a secret key (mode 0600), in the text format Nix reads (no trailing newline, like Nix). */
export function saveSecretKey(file: string, key: SecretKey): void {
  writeFileAtomic(file, key.toString(), 0o600);
}

export function savePublicKey(file: string, key: PublicKey): void {
  writeFileAtomic(file, key.toString(), 0o644);
}

/** The fields of a path info that a signature covers. */
export interface SignableInfo {
  path: string;
  narHash: Hash;
  narSize: number;
  references: readonly string[];
}

/** `1;<path>;sha256:<nix32>;<narSize>;<sorted refs joined by ','>` (spec §5.6). */
export function fingerprintPathInfo(info: SignableInfo): string {
  if (info.narHash.algo !== 'sha256') {
    throw new SigningError(`cannot compute the fingerprint of '${info.path}': its NAR hash is not sha256`);
  }
  if (!(info.narSize > 0)) {
    throw new SigningError(`cannot compute the fingerprint of '${info.path}': its NAR size is not known`);
  }
  const refs = [...info.references].sort();
  return `1;${info.path};sha256:${info.narHash.toNix32()};${info.narSize};${refs.join(',')}`;
}

/** The signature of a path info by `key`. */
export function signPathInfo(info: SignableInfo, key: SecretKey): string {
  return key.sign(fingerprintPathInfo(info));
}

/** Trusted keys by name; a name may carry several keys. */
export type KeyRing = ReadonlyMap<string, readonly PublicKey[]>;

/** Build a key ring from key objects or `name:base64` strings (invalid strings are errors). */
export function makeKeyRing(keys: Iterable<PublicKey | string>): KeyRing {
  const ring = new Map<string, PublicKey[]>();
  for (const k of keys) {
    const key = typeof k === 'string' ? PublicKey.parse(k) : k;
    const list = ring.get(key.name);
    if (list) {
      if (!list.some((x) => x.raw.equals(key.raw))) list.push(key);
    } else ring.set(key.name, [key]);
  }
  return ring;
}

function asRing(keys: KeyRing | Iterable<PublicKey | string>): KeyRing {
  return keys instanceof Map ? (keys as KeyRing) : makeKeyRing(keys as Iterable<PublicKey | string>);
}

/** Check one signature string `name:base64` over `data` against the ring. Malformed signatures are simply invalid. */
export function verifySignature(
  data: Uint8Array | string,
  signature: string,
  keys: KeyRing | Iterable<PublicKey | string>,
): boolean {
  const colon = signature.indexOf(':');
  if (colon <= 0) return false;
  const candidates = asRing(keys).get(signature.slice(0, colon));
  if (!candidates) return false;
  const b64 = signature.slice(colon + 1);
  if (!BASE64_RE.test(b64)) return false;
  const raw = Buffer.from(b64, 'base64');
  if (raw.length !== SIGNATURE_BYTES) return false;
  return candidates.some((k) => k.verifyRaw(data, raw));
}

/** The signatures of `info` (in their order, without duplicates) that are valid for a key in the ring. */
export function validPathInfoSignatures(
  info: SignableInfo & { sigs: readonly string[] },
  keys: KeyRing | Iterable<PublicKey | string>,
): string[] {
  if (info.sigs.length === 0) return [];
  const ring = asRing(keys);
  if (ring.size === 0) return [];
  let fp: string;
  try {
    fp = fingerprintPathInfo(info);
  } catch {
    return [];
  }
  const out: string[] = [];
  for (const s of new Set(info.sigs)) if (verifySignature(fp, s, ring)) out.push(s);
  return out;
}

/** True when any signature of `info` is valid for a key in `trustedPublicKeys`. */
export function verifyPathInfoSignatures(
  info: SignableInfo & { sigs: readonly string[] },
  trustedPublicKeys: KeyRing | Iterable<PublicKey | string>,
): boolean {
  return validPathInfoSignatures(info, trustedPublicKeys).length > 0;
}
