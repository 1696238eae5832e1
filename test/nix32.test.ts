import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { decode, decodedLength, encode, encodedLength, isNix32, NIX32_ALPHABET, Nix32Error } from '../src/nix32.js';
import { nix28 } from './helpers/nix.js';

describe('nix32', () => {
  it('matches the spec test vectors (§5.2)', () => {
    const z = Buffer.alloc(20);
    expect(encode(z)).toBe('00000000000000000000000000000000');
    const one = Buffer.alloc(20);
    one[0] = 1;
    expect(encode(one)).toBe('00000000000000000000000000000001');
    const high = Buffer.alloc(20);
    high[19] = 0x80;
    expect(encode(high)).toBe('h0000000000000000000000000000000');
    const seq = Buffer.from(Array.from({ length: 20 }, (_, i) => i));
    expect(encode(seq)).toBe('2c91240g1q6hq2qa1440f1h50h1h4080');
    const e3 = Buffer.from('e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855', 'hex');
    expect(encode(e3)).toBe('0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73');
    expect(decode('0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73', 32)).toEqual(e3);
    expect(decode('2c91240g1q6hq2qa1440f1h50h1h4080')).toEqual(seq);
    expect(decode('h0000000000000000000000000000000', 20)).toEqual(high);
  });

  it('has the right lengths', () => {
    expect([16, 20, 32, 64].map(encodedLength)).toEqual([26, 32, 52, 103]);
    expect([26, 32, 52, 103].map(decodedLength)).toEqual([16, 20, 32, 64]);
    expect(encode(Buffer.alloc(0))).toBe('');
    expect(decode('')).toEqual(Buffer.alloc(0));
  });

  it('round-trips random byte strings of every length 0..80', () => {
    for (let n = 0; n <= 80; n++) {
      for (let k = 0; k < 20; k++) {
        const b = randomBytes(n);
        const s = encode(b);
        expect(s.length).toBe(encodedLength(n));
        expect(isNix32(s)).toBe(true);
        expect(decode(s, n)).toEqual(b);
        expect(decode(s)).toEqual(b);
      }
    }
  });

  it('rejects characters outside the alphabet, with their position', () => {
    const good = encode(randomBytes(20));
    for (const bad of ['e', 'o', 'u', 't', 'A', '-', ' ', 'é', '\0']) {
      const s = bad + good.slice(1);
      expect(() => decode(s, 20)).toThrow(Nix32Error);
      expect(() => decode(s, 20)).toThrow(/invalid character .* at position 0/);
      expect(isNix32(s)).toBe(false);
    }
    expect(() => decode(`${good.slice(0, 10)}t${good.slice(11)}`)).toThrow(/position 10/);
  });

  it('rejects bits beyond the last byte (non-canonical encodings)', () => {
    // 20 bytes = 160 bits = exactly 32 groups: no spare bits. 32 bytes = 256 bits in 52 groups: 4 spare bits.
    expect(() => decode(`1${'0'.repeat(51)}`, 32)).not.toThrow();
    for (const c of ['g', 'z', 'h']) {
      expect(() => decode(c + '0'.repeat(51), 32)).toThrow(/beyond/);
    }
    // md5: 128 bits in 26 groups (130 bits): the top character carries 3 bits, so it may be at most 7.
    expect(decode(`7${'z'.repeat(25)}`, 16)).toEqual(Buffer.alloc(16, 0xff));
    expect(() => decode(`8${'0'.repeat(25)}`, 16)).toThrow(Nix32Error);
    // every valid string of the right length decodes and re-encodes to itself
    for (let k = 0; k < 200; k++) {
      const s = Array.from({ length: 52 }, () => NIX32_ALPHABET[Math.floor(Math.random() * 32)]).join('');
      let ok = true;
      let out: Buffer | undefined;
      try {
        out = decode(s, 32);
      } catch {
        ok = false;
      }
      // 52 * 5 - 256 = 4 spare bits: the top character carries one bit of the value
      const top = NIX32_ALPHABET.indexOf(s[0]!);
      expect(ok).toBe(top < 2);
      if (out) expect(encode(out)).toBe(s);
    }
  });

  it('rejects wrong lengths', () => {
    expect(() => decode('0'.repeat(31), 20)).toThrow(/31 characters, expected 32/);
    expect(() => decode('0'.repeat(3))).toThrow(/invalid nix32 string length/);
  });

  it('agrees with nix-hash --to-base32 / --to-base16 for every algorithm', async () => {
    for (const [algo, size] of [
      ['md5', 16],
      ['sha1', 20],
      ['sha256', 32],
      ['sha512', 64],
    ] as const) {
      const inputs = [
        Buffer.alloc(size),
        Buffer.alloc(size, 0xff),
        ...Array.from({ length: 30 }, () => randomBytes(size)),
      ];
      const hex = inputs.map((b) => b.toString('hex'));
      const r = await nix28('nix-hash', ['--type', algo, '--to-base32', ...hex]);
      const theirs = r.stdout.trim().split('\n');
      expect(theirs).toEqual(inputs.map((b) => encode(b)));
      const back = await nix28('nix-hash', ['--type', algo, '--to-base16', ...theirs]);
      expect(back.stdout.trim().split('\n')).toEqual(theirs.map((s) => decode(s, size).toString('hex')));
    }
  });
});
