/**
 * Reference scanning (spec §6.8 step 3): find which of a set of store path hash parts (32 nix32 characters) occur
 * anywhere in a byte stream, e.g. the NAR serialisation of a build output. Streaming: matches may span chunks.
 *
 * The scan looks at 32-byte windows. A window is only a candidate if all 32 bytes are nix32 characters; the window's
 * bytes are checked from its end backwards, so a non-nix32 byte at offset k lets the scan jump k + 1 positions at
 * once (most binary data is skipped 32 bytes at a time). Bytes already known to be nix32 are not re-examined, so long
 * runs of nix32 characters cost O(1) per position. Candidate windows are filtered through a bitmap of the first four
 * characters of every hash part before a string is made and looked up.
 */
import { NIX32_ALPHABET } from './nix32.js';
import { StorePath } from './store-path.js';

const HASH_LEN = 32;
const INVALID = 0xff;

/** Byte → nix32 digit value, or INVALID. */
const DIGIT = (() => {
  const t = new Uint8Array(256).fill(INVALID);
  for (let i = 0; i < NIX32_ALPHABET.length; i++) t[NIX32_ALPHABET.charCodeAt(i)] = i;
  return t;
})();

export class RefScanner {
  private readonly wanted: Set<string>;
  private readonly seen = new Set<string>();
  /** Bit set over the 20-bit value of the first four digits of every wanted hash part. */
  private readonly prefixBits = new Uint32Array(1 << 15);
  /** The last < 32 bytes of the stream so far (matches may start there). */
  private tail: Buffer = Buffer.alloc(0);
  /** Bytes scanned so far. */
  bytes = 0;

  constructor(hashParts: Iterable<string>) {
    this.wanted = new Set();
    for (const h of hashParts) {
      if (h.length !== HASH_LEN) throw new Error(`reference scanner: '${h}' is not a 32-character store path hash`);
      let p = 0;
      for (let k = 0; k < HASH_LEN; k++) {
        const d = DIGIT[h.charCodeAt(k) & 0xff]!;
        if (d === INVALID || h.charCodeAt(k) > 0xff) {
          throw new Error(`reference scanner: '${h}' contains a non-nix32 character at position ${k}`);
        }
        if (k < 4) p = (p << 5) | d;
      }
      this.wanted.add(h);
      this.prefixBits[p >>> 5] = this.prefixBits[p >>> 5]! | (1 << (p & 31));
    }
  }

  /** Feed the next chunk of the stream. The chunk is not retained (its last 31 bytes are copied). */
  update(chunk: Uint8Array): void {
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    if (buf.length === 0 || this.wanted.size === 0) {
      this.bytes += buf.length;
      return;
    }
    const keep = HASH_LEN - 1;
    if (this.tail.length > 0) {
      // Windows that start in the tail and end in this chunk.
      const joined = Buffer.concat([this.tail, buf.subarray(0, keep)]);
      this.scan(joined, Math.min(this.tail.length, joined.length - HASH_LEN + 1));
    }
    this.scan(buf, buf.length - HASH_LEN + 1);
    if (buf.length >= keep) this.tail = Buffer.from(buf.subarray(buf.length - keep));
    else {
      const t = Buffer.concat([this.tail, buf]);
      this.tail = t.length > keep ? t.subarray(t.length - keep) : t;
    }
    this.bytes += buf.length;
  }

  /** Hash parts seen so far. */
  found(): Set<string> {
    return new Set(this.seen);
  }

  /** Check every window of `b` that starts before `starts`. */
  private scan(b: Buffer, starts: number): void {
    const digit = DIGIT;
    const bits = this.prefixBits;
    let i = 0;
    // All bytes in [i, verified) are known to be nix32 characters.
    let verified = 0;
    while (i < starts) {
      // Check the window [i, i + 32) from its end down to `verified`.
      let j = i + HASH_LEN - 1;
      while (j >= verified && digit[b[j]!] !== INVALID) j--;
      if (j >= verified) {
        // b[j] is not nix32: no window containing it can match.
        verified = i + HASH_LEN;
        i = j + 1;
        continue;
      }
      // [i, i + 32) is all nix32: slide one byte at a time while the run continues, keeping the 4-digit prefix.
      let p = (digit[b[i]!]! << 15) | (digit[b[i + 1]!]! << 10) | (digit[b[i + 2]!]! << 5) | digit[b[i + 3]!]!;
      for (;;) {
        if ((bits[p >>> 5]! & (1 << (p & 31))) !== 0) this.lookup(b, i);
        i++;
        if (i >= starts) return;
        const d = digit[b[i + HASH_LEN - 1]!]!;
        if (d === INVALID) {
          // The byte at i + 31 ends every window up to it: restart after it.
          i += HASH_LEN;
          verified = i;
          break;
        }
        p = ((p << 5) | digit[b[i + 3]!]!) & 0xfffff;
      }
    }
  }

  private lookup(b: Buffer, i: number): void {
    const s = b.toString('latin1', i, i + HASH_LEN);
    if (this.wanted.has(s)) this.seen.add(s);
  }
}

/**
 * Scan a byte stream for references to any of `candidates` (full store paths); returns the candidates whose hash
 * part occurs, sorted.
 */
export async function scanForReferences(
  source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
  candidates: Iterable<string>,
  storeDir?: string,
): Promise<string[]> {
  const byHash = new Map<string, string[]>();
  for (const c of candidates) {
    const h = StorePath.parse(c, storeDir).hashPart;
    const l = byHash.get(h);
    if (l) l.push(c);
    else byHash.set(h, [c]);
  }
  const scanner = new RefScanner(byHash.keys());
  for await (const chunk of source) scanner.update(chunk);
  const out: string[] = [];
  for (const h of scanner.found()) out.push(...byHash.get(h)!);
  return [...new Set(out)].sort();
}
