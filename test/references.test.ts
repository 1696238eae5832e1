import { randomBytes, randomInt } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { encode, NIX32_ALPHABET } from '../src/nix32.js';
import { RefScanner, scanForReferences } from '../src/references.js';
import { runBuffer, tempDir } from './helpers/exec.js';
import { nix28, nixEnv } from './helpers/nix.js';

const tmp = tempDir('buildbox-refs-');
afterAll(() => tmp.cleanup());

const randomHash = () => encode(randomBytes(20));

function naive(data: Buffer, hashes: string[]): Set<string> {
  return new Set(hashes.filter((h) => data.includes(h, 0, 'latin1')));
}

/** Split `data` into random chunks (including empty and 1-byte ones). */
function randomChunks(data: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let i = 0;
  while (i < data.length) {
    const r = Math.random();
    const n = r < 0.1 ? 0 : r < 0.3 ? 1 + randomInt(40) : 1 + randomInt(4000);
    out.push(Buffer.from(data.subarray(i, i + n)));
    i += n;
  }
  return out;
}

function scan(hashes: Iterable<string>, chunks: Buffer[]): Set<string> {
  const s = new RefScanner(hashes);
  for (const c of chunks) s.update(c);
  return s.found();
}

describe('RefScanner', () => {
  it('finds hashes anywhere, including across chunk boundaries (randomised)', () => {
    for (let round = 0; round < 300; round++) {
      const hashes = Array.from({ length: 1 + randomInt(30) }, randomHash);
      const len = randomInt(20_000);
      // background: random bytes, or nix32-only text (the hard case), or a mix
      const kind = round % 3;
      const data =
        kind === 0
          ? randomBytes(len)
          : Buffer.from(
              Array.from({ length: len }, () =>
                kind === 1 || Math.random() < 0.9 ? NIX32_ALPHABET.charCodeAt(randomInt(32)) : randomInt(256),
              ),
            );
      // plant some hashes (sometimes overlapping, at the very start and end)
      for (const h of hashes) {
        if (Math.random() < 0.5 || data.length < 32) continue;
        const at = Math.random() < 0.1 ? 0 : Math.random() < 0.1 ? data.length - 32 : randomInt(data.length - 31);
        data.write(h, at, 'latin1');
      }
      // near misses: a hash with one character changed
      if (data.length >= 32) {
        const h = hashes[0]!;
        const miss = h.slice(0, 31) + (h[31] === '0' ? '1' : '0');
        data.write(miss, randomInt(data.length - 31), 'latin1');
      }
      const expected = naive(data, hashes);
      expect(scan(hashes, randomChunks(data))).toEqual(expected);
      expect(scan(hashes, [data])).toEqual(expected);
    }
  });

  it('handles byte-by-byte feeding and hashes split at every offset', () => {
    const h = randomHash();
    const other = randomHash();
    const data = Buffer.from(`xx${h}yy`, 'latin1');
    for (let cut = 0; cut <= data.length; cut++) {
      expect(scan([h, other], [data.subarray(0, cut), data.subarray(cut)])).toEqual(new Set([h]));
    }
    const s = new RefScanner([h]);
    for (const b of data) s.update(Buffer.from([b]));
    expect(s.found()).toEqual(new Set([h]));
    expect(s.bytes).toBe(data.length);
    // inside a longer nix32 run the hash is still found (windows overlap)
    expect(scan([h], [Buffer.from(`abc${h}def`)])).toEqual(new Set([h]));
    expect(scan([h], [Buffer.from(h.slice(0, 31))])).toEqual(new Set());
    expect(scan([], [data])).toEqual(new Set());
  });

  it('rejects malformed hash parts', () => {
    expect(() => new RefScanner(['abc'])).toThrow(/not a 32-character/);
    expect(() => new RefScanner([`e${'0'.repeat(31)}`])).toThrow(/non-nix32 character at position 0/);
  });

  it('agrees with the references Nix 2.8 found for a real build', async () => {
    // a dependency, and a build whose output mentions it (in a file, a file name and a symlink target)
    const dep = (await nix28('nix-store', ['--add', writeTmp('dep.txt', 'dep\n')])).stdout.trim();
    const unused = (
      await nix28('nix-store', ['--add', writeTmp('unused.txt', `unused ${Math.random()}\n`)])
    ).stdout.trim();
    const expr = `derivation {
      name = "refs-${Date.now()}"; PATH = "/usr/bin:/bin"; system = builtins.currentSystem; builder = "/bin/sh";
      dep = builtins.storePath ${dep}; unused = builtins.storePath ${unused};
      args = [ "-c" "mkdir $out && echo $dep > $out/f && ln -s $dep $out/l && touch $out/$(basename $dep) && echo $out > $out/self" ];
    }`;
    const out = (await nix28('nix-build', ['--no-out-link', '-E', expr])).stdout.trim();
    const nixRefs = (await nix28('nix-store', ['-q', '--references', out])).stdout.trim().split('\n').sort();
    const nar = await runBuffer('nix-store', ['--dump', out], nixEnv());
    const ours = await scanForReferences(randomChunks(nar), [dep, unused, out]);
    expect(ours).toEqual(nixRefs);
    expect(ours).toEqual([dep, out].sort());
  });

  it('is fast (reports throughput)', () => {
    const hashes = Array.from({ length: 2000 }, randomHash);
    const size = 64 << 20;
    const random = randomBytes(size);
    const text = Buffer.alloc(size);
    for (let i = 0; i < size; i++) text[i] = NIX32_ALPHABET.charCodeAt(i % 31);
    for (const [label, data, minMBs] of [
      ['random bytes', random, 300],
      ['nix32-only text', text, 50],
    ] as const) {
      const s = new RefScanner(hashes);
      const t0 = performance.now();
      for (let i = 0; i < data.length; i += 65536) s.update(data.subarray(i, i + 65536));
      const secs = (performance.now() - t0) / 1000;
      const mbs = size / 2 ** 20 / secs;
      console.log(`RefScanner on ${label}: ${mbs.toFixed(0)} MB/s`);
      expect(mbs).toBeGreaterThan(minMBs);
    }
  });
});

function writeTmp(name: string, content: string): string {
  const p = join(tmp.path, name);
  writeFileSync(p, content);
  return p;
}
