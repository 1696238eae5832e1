/**
 * nix32, the "Nix base-32" encoding of hashes and store path hash parts (spec §5.2).
 *
 * Not RFC 4648: the alphabet omits e, o, u and t, and the bits are taken little-endian with the most significant
 * 5-bit group written first. `n` bytes encode to `ceil(8n / 5)` characters (20 → 32, 32 → 52, 64 → 103).
 */

export const NIX32_ALPHABET = '0123456789abcdfghijklmnpqrsvwxyz';

/** Maps a character code to its 5-bit value, or -1 for characters outside the alphabet. */
const DECODE = new Int8Array(256).fill(-1);
for (let i = 0; i < NIX32_ALPHABET.length; i++) DECODE[NIX32_ALPHABET.charCodeAt(i)] = i;

/** Lookup table (by byte value) telling whether a byte is a nix32 character; shared with the reference scanner. */
export const IS_NIX32_BYTE: Uint8Array = (() => {
  const t = new Uint8Array(256);
  for (let i = 0; i < NIX32_ALPHABET.length; i++) t[NIX32_ALPHABET.charCodeAt(i)] = 1;
  return t;
})();

export class Nix32Error extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'Nix32Error';
  }
}

/** Number of nix32 characters that encode `bytes` bytes. */
export function encodedLength(bytes: number): number {
  return bytes === 0 ? 0 : Math.floor((bytes * 8 - 1) / 5) + 1;
}

/** Number of bytes encoded by a nix32 string of `chars` characters (the inverse of `encodedLength`). */
export function decodedLength(chars: number): number {
  return Math.floor((chars * 5) / 8);
}

export function encode(bytes: Uint8Array): string {
  const n = bytes.length;
  const len = encodedLength(n);
  let out = '';
  for (let k = 0; k < len; k++) {
    const b = (len - 1 - k) * 5;
    const i = b >>> 3;
    const j = b & 7;
    const c = (bytes[i]! >>> j) | (i + 1 < n ? bytes[i + 1]! << (8 - j) : 0);
    out += NIX32_ALPHABET[c & 0x1f];
  }
  return out;
}

/** True when every character of `s` is in the nix32 alphabet. */
export function isNix32(s: string): boolean {
  for (let k = 0; k < s.length; k++) {
    const c = s.charCodeAt(k);
    if (c > 255 || DECODE[c]! < 0) return false;
  }
  return true;
}

/**
 * Decode a nix32 string. With `expectedBytes`, the string must have exactly the matching length. Characters outside
 * the alphabet and set bits that would fall beyond the last byte are errors.
 */
export function decode(s: string, expectedBytes?: number): Buffer {
  const n = expectedBytes ?? decodedLength(s.length);
  if (encodedLength(n) !== s.length) {
    throw new Nix32Error(
      expectedBytes === undefined
        ? `invalid nix32 string length ${s.length}`
        : `nix32 string has ${s.length} characters, expected ${encodedLength(n)} for ${n} bytes`,
    );
  }
  const out = Buffer.alloc(n);
  const len = s.length;
  for (let k = 0; k < len; k++) {
    const code = s.charCodeAt(k);
    const digit = code > 255 ? -1 : DECODE[code]!;
    if (digit < 0) {
      throw new Nix32Error(`invalid character ${JSON.stringify(s[k])} at position ${k} of nix32 string`);
    }
    const b = (len - 1 - k) * 5;
    const i = b >>> 3;
    const j = b & 7;
    out[i] = out[i]! | ((digit << j) & 0xff);
    const carry = digit >>> (8 - j);
    if (carry !== 0) {
      if (i + 1 < n) out[i + 1] = out[i + 1]! | carry;
      else throw new Nix32Error(`invalid nix32 string: character ${k} sets bits beyond the ${n}-byte value`);
    }
  }
  return out;
}
