/**
 * Cryptographic hashes as Nix writes and parses them (spec §1.3, §5.2): base16, nix32, base64, each optionally
 * prefixed `<algo>:`, and SRI `<algo>-<base64>`.
 */
import { createHash, type Hash as NodeHash } from 'node:crypto';
import * as nix32 from './nix32.js';

export type HashAlgo = 'md5' | 'sha1' | 'sha256' | 'sha512';
export type HashFormat = 'base16' | 'nix32' | 'base64' | 'sri';

export const HASH_ALGOS: readonly HashAlgo[] = ['md5', 'sha1', 'sha256', 'sha512'];

/** Digest size in bytes of each algorithm. */
export const HASH_SIZE: Readonly<Record<HashAlgo, number>> = { md5: 16, sha1: 20, sha256: 32, sha512: 64 };

export class HashError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HashError';
  }
}

export function isHashAlgo(s: string): s is HashAlgo {
  return s === 'md5' || s === 'sha1' || s === 'sha256' || s === 'sha512';
}

/** Parse an algorithm name, with a clear error for unknown ones. */
export function parseHashAlgo(s: string): HashAlgo {
  if (!isHashAlgo(s)) throw new HashError(`unknown hash algorithm '${s}' (expected md5, sha1, sha256 or sha512)`);
  return s;
}

function base64Length(size: number): number {
  return Math.ceil(size / 3) * 4;
}

const HEX_RE = /^[0-9a-fA-F]*$/;
const BASE64_RE = /^[A-Za-z0-9+/]*={0,2}$/;

/** A digest together with its algorithm. Immutable by convention. */
export class Hash {
  readonly algo: HashAlgo;
  readonly digest: Buffer;

  constructor(algo: HashAlgo, digest: Uint8Array) {
    const size = HASH_SIZE[algo];
    if (size === undefined) throw new HashError(`unknown hash algorithm '${String(algo)}'`);
    if (digest.length !== size) {
      throw new HashError(`a ${algo} digest must be ${size} bytes, got ${digest.length}`);
    }
    this.algo = algo;
    this.digest = Buffer.from(digest);
  }

  toBase16(): string {
    return this.digest.toString('hex');
  }

  toNix32(): string {
    return nix32.encode(this.digest);
  }

  toBase64(): string {
    return this.digest.toString('base64');
  }

  toSRI(): string {
    return `${this.algo}-${this.toBase64()}`;
  }

  /** `prefixed` adds `<algo>:` to the base16/nix32/base64 forms; SRI always carries its algorithm. */
  toString(format: HashFormat = 'sri', prefixed = true): string {
    let body: string;
    switch (format) {
      case 'sri':
        return this.toSRI();
      case 'base16':
        body = this.toBase16();
        break;
      case 'nix32':
        body = this.toNix32();
        break;
      case 'base64':
        body = this.toBase64();
        break;
      default:
        throw new HashError(`unknown hash format '${String(format)}'`);
    }
    return prefixed ? `${this.algo}:${body}` : body;
  }

  equals(other: Hash): boolean {
    return this.algo === other.algo && this.digest.equals(other.digest);
  }

  /**
   * Parse a hash in any format. A prefix `<algo>:` or SRI `<algo>-` is optional when `defaultAlgo` is given; when
   * both are present they must agree. Bare strings are base16, nix32 or base64 according to their length.
   */
  static parseAny(s: string, defaultAlgo?: HashAlgo): Hash {
    const { algo, rest, sri } = splitPrefix(s);
    if (algo !== undefined) {
      if (defaultAlgo !== undefined && algo !== defaultAlgo) {
        throw new HashError(`hash '${s}' should have type '${defaultAlgo}', not '${algo}'`);
      }
      return decodeBody(s, rest, algo, sri);
    }
    if (defaultAlgo === undefined) throw new HashError(`hash '${s}' does not include a type`);
    return decodeBody(s, s, defaultAlgo, false);
  }

  /** Parse a hash that must name its algorithm: `<algo>:<base16|nix32|base64>` or SRI `<algo>-<base64>`. */
  static parseAnyPrefixed(s: string): Hash {
    const { algo, rest, sri } = splitPrefix(s);
    if (algo === undefined) {
      throw new HashError(`hash '${s}' does not include a type, nor is it in SRI format`);
    }
    return decodeBody(s, rest, algo, sri);
  }

  /** Parse an unprefixed hash of a known algorithm (base16, nix32 or base64, by length). */
  static parse(s: string, algo: HashAlgo): Hash {
    return decodeBody(s, s, algo, false);
  }

  /** Parse an SRI hash `<algo>-<base64>`. */
  static parseSRI(s: string): Hash {
    const { algo, rest, sri } = splitPrefix(s);
    if (algo === undefined || !sri) throw new HashError(`hash '${s}' is not in SRI format`);
    return decodeBody(s, rest, algo, true);
  }

  static fromBase16(algo: HashAlgo, hex: string): Hash {
    return decodeBase16(hex, hex, algo);
  }
}

function splitPrefix(s: string): { algo?: HashAlgo; rest: string; sri: boolean } {
  const colon = s.indexOf(':');
  if (colon >= 0) {
    return { algo: parseHashAlgo(s.slice(0, colon)), rest: s.slice(colon + 1), sri: false };
  }
  const dash = s.indexOf('-');
  if (dash >= 0) {
    const name = s.slice(0, dash);
    if (!isHashAlgo(name)) throw new HashError(`unknown hash algorithm '${name}' in hash '${s}'`);
    return { algo: name, rest: s.slice(dash + 1), sri: true };
  }
  return { rest: s, sri: false };
}

function decodeBase16(whole: string, body: string, algo: HashAlgo): Hash {
  if (!HEX_RE.test(body)) throw new HashError(`invalid base16 in ${algo} hash '${whole}'`);
  return new Hash(algo, Buffer.from(body, 'hex'));
}

function decodeBase64(whole: string, body: string, algo: HashAlgo): Hash {
  const size = HASH_SIZE[algo];
  if (body.length !== base64Length(size) || !BASE64_RE.test(body)) {
    throw new HashError(`invalid base64 in ${algo} hash '${whole}'`);
  }
  const digest = Buffer.from(body, 'base64');
  // Node's decoder is lenient; insist on the canonical encoding (padding and unused bits).
  if (digest.length !== size || digest.toString('base64') !== body) {
    throw new HashError(`invalid base64 in ${algo} hash '${whole}'`);
  }
  return new Hash(algo, digest);
}

function decodeBody(whole: string, body: string, algo: HashAlgo, sri: boolean): Hash {
  const size = HASH_SIZE[algo];
  if (sri) return decodeBase64(whole, body, algo);
  if (body.length === size * 2) return decodeBase16(whole, body, algo);
  if (body.length === nix32.encodedLength(size)) {
    try {
      return new Hash(algo, nix32.decode(body, size));
    } catch (e) {
      throw new HashError(`invalid nix32 in ${algo} hash '${whole}': ${(e as Error).message}`);
    }
  }
  if (body.length === base64Length(size)) return decodeBase64(whole, body, algo);
  throw new HashError(
    `hash '${whole}' has wrong length for hash type '${algo}' (expected ${size * 2} base16, ` +
      `${nix32.encodedLength(size)} nix32 or ${base64Length(size)} base64 characters)`,
  );
}

/** Hash a byte string (strings are hashed as UTF-8; convert latin1 derivation strings with Buffer.from(s,'latin1')). */
export function hashBytes(algo: HashAlgo, data: Uint8Array | string): Hash {
  return new Hash(algo, createHash(algo).update(data).digest());
}

/** Convenience: the sha256 of a byte string. */
export function sha256(data: Uint8Array | string): Hash {
  return hashBytes('sha256', data);
}

/** Incremental hashing that also counts bytes (e.g. NAR hash and NAR size in one pass). */
export class HashSink {
  private readonly h: NodeHash;
  private finished = false;
  /** Bytes consumed so far. */
  size = 0;

  constructor(readonly algo: HashAlgo) {
    this.h = createHash(algo);
  }

  update(chunk: Uint8Array): this {
    if (this.finished) throw new HashError('HashSink used after finish()');
    this.h.update(chunk);
    this.size += chunk.length;
    return this;
  }

  finish(): { hash: Hash; size: number } {
    if (this.finished) throw new HashError('HashSink finished twice');
    this.finished = true;
    return { hash: new Hash(this.algo, this.h.digest()), size: this.size };
  }
}

/** Hash everything an async byte source yields. */
export async function hashStream(
  algo: HashAlgo,
  source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
): Promise<{ hash: Hash; size: number }> {
  const sink = new HashSink(algo);
  for await (const chunk of source) sink.update(chunk);
  return sink.finish();
}
