import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { HASH_ALGOS, HASH_SIZE, Hash, HashError, HashSink, hashBytes, hashStream, sha256 } from '../src/hash.js';
import { tempDir } from './helpers/exec.js';
import { nix28 } from './helpers/nix.js';

const tmp = tempDir('buildbox-hash-');
afterAll(() => tmp.cleanup());

const HELLO_SHA256 = '5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03';
const HELLO_NIX32 = '00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq';

describe('Hash', () => {
  it('formats hello\\n like the spec (§4.2)', () => {
    const h = hashBytes('sha256', 'hello\n');
    expect(h.toBase16()).toBe(HELLO_SHA256);
    expect(h.toNix32()).toBe(HELLO_NIX32);
    expect(h.toString('nix32')).toBe(`sha256:${HELLO_NIX32}`);
    expect(h.toString('base16', false)).toBe(HELLO_SHA256);
    expect(h.toString('sri')).toBe(`sha256-${Buffer.from(HELLO_SHA256, 'hex').toString('base64')}`);
    expect(h.toString('base64')).toBe(`sha256:${h.toBase64()}`);
  });

  it('matches `nix hash file` in every format and algorithm', async () => {
    const files: string[] = [];
    const contents: Buffer[] = [];
    for (let i = 0; i < 6; i++) {
      const data = i === 0 ? Buffer.alloc(0) : randomBytes(1 + Math.floor(Math.random() * 5000));
      const f = join(tmp.path, `f${i}`);
      writeFileSync(f, data);
      files.push(f);
      contents.push(data);
    }
    for (const algo of HASH_ALGOS) {
      for (const [flag, fmt] of [
        ['--base16', 'base16'],
        ['--base32', 'nix32'],
        ['--base64', 'base64'],
        ['--sri', 'sri'],
      ] as const) {
        const r = await nix28('nix', ['hash', 'file', '--type', algo, flag, ...files]);
        const theirs = r.stdout.trim().split('\n');
        const ours = contents.map((c) => hashBytes(algo, c).toString(fmt, false));
        expect(theirs).toEqual(ours);
        // and everything Nix prints parses back to the same digest
        for (let i = 0; i < theirs.length; i++) {
          const parsed = fmt === 'sri' ? Hash.parseAnyPrefixed(theirs[i]!) : Hash.parseAny(theirs[i]!, algo);
          expect(parsed.equals(hashBytes(algo, contents[i]!))).toBe(true);
        }
      }
    }
  });

  it('parses what `nix hash to-base16` accepts, to the same digest', async () => {
    for (const algo of HASH_ALGOS) {
      const h = new Hash(algo, randomBytes(HASH_SIZE[algo]));
      const forms = [
        h.toString('base16', true),
        h.toString('nix32', true),
        h.toString('base64', true),
        h.toSRI(),
        h.toString('base16', false),
        h.toString('nix32', false),
        h.toString('base64', false),
      ];
      const r = await nix28('nix', ['hash', 'to-base16', '--type', algo, ...forms]);
      expect(r.stdout.trim().split('\n')).toEqual(forms.map(() => h.toBase16()));
      for (const f of forms) expect(Hash.parseAny(f, algo).equals(h)).toBe(true);
      for (const f of forms.slice(0, 4)) expect(Hash.parseAnyPrefixed(f).equals(h)).toBe(true);
      for (const f of forms.slice(4)) expect(Hash.parse(f, algo).equals(h)).toBe(true);
      expect(Hash.parseSRI(h.toSRI()).equals(h)).toBe(true);
      expect(Hash.parseAny(h.toString('base16', true).toUpperCase().replace(algo.toUpperCase(), algo)).equals(h)).toBe(
        true,
      );
    }
  });

  it('gives clear errors for bad input', () => {
    expect(() => Hash.parseAny(HELLO_SHA256)).toThrow(/does not include a type/);
    expect(() => Hash.parseAnyPrefixed(HELLO_SHA256)).toThrow(/does not include a type, nor is it in SRI format/);
    expect(() => Hash.parseAny(`sha1:${HELLO_SHA256}`)).toThrow(/wrong length for hash type 'sha1'/);
    expect(() => Hash.parseAny(`sha256:${HELLO_SHA256}`, 'sha1')).toThrow(/should have type 'sha1'/);
    expect(() => Hash.parseAny(`blake3:${HELLO_SHA256}`)).toThrow(/unknown hash algorithm 'blake3'/);
    expect(() => Hash.parseAny(`sha256:${HELLO_SHA256.slice(1)}x`)).toThrow(/invalid base16/);
    expect(() => Hash.parseAny(`sha256:${HELLO_NIX32.slice(1)}e`)).toThrow(/invalid nix32.*position 51/);
    expect(() => Hash.parseAny(`sha256:z${HELLO_NIX32.slice(1)}`)).toThrow(/invalid nix32/);
    expect(() => Hash.parseAny(`sha256-${'A'.repeat(43)}`)).toThrow(/invalid base64/); // no padding
    expect(() => Hash.parseAny(`sha256-${'A'.repeat(42)}B=`)).toThrow(/invalid base64/); // non-zero spare bits
    expect(() => Hash.parseAny(`sha256-${HELLO_SHA256}`)).toThrow(/invalid base64/); // SRI is base64 only
    expect(() => Hash.parseAny('sha256:')).toThrow(HashError);
    expect(() => Hash.parse('abc', 'md5')).toThrow(/expected 32 base16, 26 nix32 or 24 base64/);
    expect(() => new Hash('sha256', Buffer.alloc(20))).toThrow(/must be 32 bytes/);
  });

  it('hashes streams incrementally with a byte count', async () => {
    const data = randomBytes(100_000);
    const sink = new HashSink('sha512');
    for (let i = 0; i < data.length; i += 777) sink.update(data.subarray(i, i + 777));
    const r = sink.finish();
    expect(r.size).toBe(data.length);
    expect(r.hash.equals(hashBytes('sha512', data))).toBe(true);
    expect(() => sink.update(data)).toThrow(/after finish/);
    async function* gen() {
      yield data.subarray(0, 10);
      yield data.subarray(10);
    }
    const s = await hashStream('sha256', gen());
    expect(s.hash.equals(sha256(data))).toBe(true);
    expect(s.size).toBe(data.length);
  });
});
