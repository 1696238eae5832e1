import { randomBytes } from 'node:crypto';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { HASH_ALGOS, Hash, type HashAlgo, hashBytes, sha256 } from '../src/hash.js';
import {
  type ContentAddressMethod,
  compressHash,
  DEFAULT_STORE_DIR,
  isValidName,
  makeFixedOutputPath,
  makeOutputPath,
  makeStorePath,
  makeTextPath,
  outputPathName,
  parseContentAddress,
  parseContentAddressMethod,
  parseMethodAlgo,
  renderContentAddress,
  renderContentAddressMethod,
  renderMethodAlgo,
  StorePath,
  StorePathError,
} from '../src/store-path.js';
import { tempDir } from './helpers/exec.js';
import { nix28 } from './helpers/nix.js';

const tmp = tempDir('buildbox-storepath-');
afterAll(() => tmp.cleanup());

const HELLO_FLAT = Hash.parse('5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03', 'sha256');
const HELLO_NAR = Hash.parse('1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13', 'sha256');

async function narHash(algo: HashAlgo, path: string): Promise<Hash> {
  const r = await nix28('nix-hash', ['--type', algo, path]);
  return Hash.parse(r.stdout.trim(), algo);
}

async function flatHash(algo: HashAlgo, path: string): Promise<Hash> {
  const r = await nix28('nix-hash', ['--type', algo, '--flat', '--base32', path]);
  return Hash.parse(r.stdout.trim(), algo);
}

describe('StorePath', () => {
  const H = 'i9pmrzmpshapij2kin22pff6fc2adavx';

  it('parses and prints', () => {
    const p = StorePath.parse(`/nix/store/${H}-hello.txt`);
    expect(p.hashPart).toBe(H);
    expect(p.name).toBe('hello.txt');
    expect(p.baseName).toBe(`${H}-hello.txt`);
    expect(p.toString()).toBe(`/nix/store/${H}-hello.txt`);
    expect(p.toString('/foo/store')).toBe(`/foo/store/${H}-hello.txt`);
    expect(p.isDerivation).toBe(false);
    expect(StorePath.parse(`/foo/store/${H}-x.drv`, '/foo/store').isDerivation).toBe(true);
    expect(StorePath.fromBaseName(`${H}-a-b`).name).toBe('a-b');
    expect(StorePath.parse(`/nix/store/${H}-${'a'.repeat(211)}`).name.length).toBe(211);
    expect(StorePath.parse(`/nix/store/${H}-+-._?=AZaz09`).name).toBe('+-._?=AZaz09');
    expect(StorePath.parse(`/nix/store/${H}-.a`).name).toBe('.a');
    expect(StorePath.parse(`/nix/store/${H}-...`).name).toBe('...');
    const w = StorePath.parseWithin(`/nix/store/${H}-busybox/bin/sh`);
    expect(w.storePath.name).toBe('busybox');
    expect(w.subPath).toBe('/bin/sh');
    expect(StorePath.parseWithin(`/nix/store/${H}-busybox`).subPath).toBe('');
    expect(StorePath.isStorePath(`/nix/store/${H}-x`)).toBe(true);
    expect(StorePath.isStorePath(`/nix/store/${H}-x/`)).toBe(false);
  });

  it('rejects invalid paths with precise errors', () => {
    const bad: Array<[string, RegExp]> = [
      [`/nix/stor/${H}-x`, /not in the Nix store/],
      [`nix/store/${H}-x`, /not in the Nix store/],
      [`/nix/store/${H}-x/bin`, /not a store path \(it is inside one/],
      [`/nix/store/${H}-x/`, /not a store path/],
      [`/nix/store/${H}`, /expected 32 nix32 characters, a dash and a name/],
      [`/nix/store/${H}-`, /expected 32 nix32 characters/],
      [`/nix/store/${H.slice(1)}-xx`, /expected 32 nix32 characters/],
      [`/nix/store/${H.slice(1)}e-x`, /non-nix32 character "e" at position 31/],
      [`/nix/store/${H.toUpperCase()}-x`, /non-nix32 character "I" at position 0/],
      [`/nix/store/${H}-${'a'.repeat(212)}`, /longer than 211 characters \(212\)/],
      [`/nix/store/${H}-a b`, /forbidden character " " at position 1/],
      [`/nix/store/${H}-a/b`, /inside one/],
      [`/nix/store/${H}-é`, /forbidden character "é"/],
      [`/nix/store/${H}-a:b`, /forbidden character ":"/],
      [`/nix/store/${H}-.`, /may not be '.'/],
      [`/nix/store/${H}-..`, /may not be '..'/],
      [`/nix/store/${H}-.-x`, /may not start with '.-'/],
      [`/nix/store/${H}-..-x`, /may not start with '..-'/],
    ];
    for (const [p, re] of bad) {
      expect(() => StorePath.parse(p), p).toThrow(StorePathError);
      expect(() => StorePath.parse(p), p).toThrow(re);
    }
    expect(() => StorePath.parse(`/nix/store/${H}-x`, '/nix/store/')).toThrow(/trailing slash/);
    expect(isValidName('')).toBe(false);
    expect(isValidName('hello-1.0')).toBe(true);
  });
});

describe('store path computation', () => {
  it('reproduces the worked example of §5.3', () => {
    const fp = `source:sha256:${HELLO_NAR.toBase16()}:/nix/store:hello.txt`;
    const d = sha256(fp).digest;
    expect(d.toString('hex')).toBe('fe50c26088fb1e2ba70dc3de7815d4b7fe5c6f8a83fb6464fb3da70023809016');
    expect(compressHash(d, 20).toString('hex')).toBe('7daba60473c6b92b848d53c87815d4b7fe5c6f8a');
    expect(makeStorePath('source', HELLO_NAR, 'hello.txt')).toBe(
      '/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt',
    );
  });

  it('reproduces the §5.4 table', () => {
    const fixed = (method: ContentAddressMethod, hash: Hash, name = 'hello.txt') =>
      makeFixedOutputPath(name, { method, hash });
    expect(fixed('recursive', HELLO_NAR)).toBe('/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt');
    expect(fixed('flat', HELLO_FLAT)).toBe('/nix/store/gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt');
    expect(fixed('flat', Hash.parse('f572d396fae9206628714fb2ce00f72e94f2258f', 'sha1'))).toBe(
      '/nix/store/svdva85yi507g9vncgsaxvnd1r808h4w-hello.txt',
    );
    expect(fixed('recursive', Hash.parse('0deb52c2735eb38d360f976b7b3823c4ad05cce7', 'sha1'))).toBe(
      '/nix/store/hzq8n5jpi3g2d0xhlvqd8q1gx5c9s6i3-hello.txt',
    );
    expect(fixed('flat', HELLO_FLAT, 'fod')).toBe('/nix/store/rcz8aqa9lzcygdcn1q53xz03vc3svrcp-fod');
    expect(makeTextPath('foo.txt', HELLO_FLAT)).toBe('/nix/store/xl3jbiq4g9jnqn8yp9y4cski5n3ylk1q-foo.txt');
    expect(fixed('text', sha256('data\n'), 'src.txt')).toBe('/nix/store/wch608fni0wbbnm4bp24ha2fpdx3yaij-src.txt');
    expect(outputPathName('demo', 'out')).toBe('demo');
    expect(outputPathName('demo', 'dev')).toBe('demo-dev');
    const hm = Hash.parse('0697f4148e0fc216d4d9658a202ea6f746beb8267c23fab3b96b1f0338609ccf', 'sha256');
    expect(makeOutputPath('out', hm, 'demo')).toBe('/nix/store/2llmmjm433f590zck8372x39spgcdsl4-demo');
    expect(makeOutputPath('dev', hm, 'demo')).toBe('/nix/store/d2rch1690vmdj9x8byy81h3n1pqpbn3g-demo-dev');
  });

  it('refuses impossible combinations', () => {
    const ref = '/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt';
    expect(() => makeFixedOutputPath('x', { method: 'flat', hash: HELLO_FLAT }, [ref])).toThrow(
      /may not refer to other store paths/,
    );
    expect(() => makeFixedOutputPath('x', { method: 'text', hash: HELLO_FLAT }, [], true)).toThrow(/itself/);
    expect(() => makeTextPath('x', hashBytes('sha1', 'a'))).toThrow(/must use sha256/);
    expect(() => makeFixedOutputPath('x', { method: 'git', hash: HELLO_FLAT })).toThrow(/must use sha1/);
    expect(() => makeStorePath('source', HELLO_NAR, 'a b')).toThrow(/forbidden character/);
    expect(() => makeTextPath('x', HELLO_FLAT, ['/nix/store/bad'])).toThrow(StorePathError);
    // references are sorted and de-duplicated, and `self` changes the path
    const r2 = '/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-a';
    const a = makeFixedOutputPath('x', { method: 'recursive', hash: HELLO_NAR }, [ref, r2]);
    expect(makeFixedOutputPath('x', { method: 'recursive', hash: HELLO_NAR }, [r2, ref, r2])).toBe(a);
    expect(makeFixedOutputPath('x', { method: 'recursive', hash: HELLO_NAR }, [r2, ref], true)).not.toBe(a);
    expect(a).toBe(makeStorePath(`source:${r2}:${ref}`, HELLO_NAR, 'x'));
    expect(makeFixedOutputPath('x', { method: 'recursive', hash: HELLO_NAR }, [], true)).toBe(
      makeStorePath('source:self', HELLO_NAR, 'x'),
    );
  });

  it('equals `nix-store --add` and `--add-fixed` (flat and recursive, every algorithm) on random files', async () => {
    for (let i = 0; i < 3; i++) {
      const f = join(tmp.path, `file-${i}.bin`);
      writeFileSync(f, randomBytes(100 + i * 1000));
      const added = (await nix28('nix-store', ['--add', f])).stdout.trim();
      expect(makeFixedOutputPath(`file-${i}.bin`, { method: 'recursive', hash: await narHash('sha256', f) })).toBe(
        added,
      );
      for (const algo of HASH_ALGOS) {
        const flat = (await nix28('nix-store', ['--add-fixed', algo, f])).stdout.trim();
        expect(makeFixedOutputPath(`file-${i}.bin`, { method: 'flat', hash: await flatHash(algo, f) }), algo).toBe(
          flat,
        );
        const rec = (await nix28('nix-store', ['--add-fixed', '--recursive', algo, f])).stdout.trim();
        expect(makeFixedOutputPath(`file-${i}.bin`, { method: 'recursive', hash: await narHash(algo, f) }), algo).toBe(
          rec,
        );
        // the `ca` Nix records is what renderContentAddress produces, and parses back
        const info = JSON.parse((await nix28('nix', ['path-info', '--json', flat, rec])).stdout) as Array<{
          path: string;
          ca: string;
        }>;
        const ca = new Map(info.map((i) => [i.path, i.ca]));
        expect(ca.get(flat)).toBe(renderContentAddress({ method: 'flat', hash: await flatHash(algo, f) }));
        expect(ca.get(rec)).toBe(renderContentAddress({ method: 'recursive', hash: await narHash(algo, f) }));
        for (const { ca } of info) expect(renderContentAddress(parseContentAddress(ca))).toBe(ca);
      }
    }
  });

  it('equals `nix-store --add` of a directory tree', async () => {
    const d = join(tmp.path, 'tree');
    mkdirSync(join(d, 'sub'), { recursive: true });
    writeFileSync(join(d, 'a.sh'), '#!/bin/sh\n', { mode: 0o755 });
    writeFileSync(join(d, 'b.txt'), randomBytes(64));
    symlinkSync('b.txt', join(d, 'sub', 'link'));
    const added = (await nix28('nix-store', ['--add', d])).stdout.trim();
    expect(makeFixedOutputPath('tree', { method: 'recursive', hash: await narHash('sha256', d) })).toBe(added);
  });

  it('equals builtins.toFile with references, in another store directory', async () => {
    const storeDir = '/foo/bar-store';
    const expr =
      'let a = builtins.toFile "a" "b"; c = builtins.toFile "c.txt" "d\\n"; ' +
      `in [ a c (builtins.toFile "x" "\${a} and \${c}") (builtins.toFile "y" "\${c}") ]`;
    const r = await nix28('nix-instantiate', ['--eval', '--strict', '--json', '--readonly-mode', '-E', expr], {
      env: { NIX_STORE_DIR: storeDir },
    });
    const [a, c, x, y] = JSON.parse(r.stdout) as string[];
    expect(makeTextPath('a', sha256('b'), [], storeDir)).toBe(a);
    expect(makeTextPath('c.txt', sha256('d\n'), [], storeDir)).toBe(c);
    expect(makeTextPath('x', sha256(`${a} and ${c}`), [c!, a!], storeDir)).toBe(x);
    expect(makeTextPath('y', sha256(`${c}`), [c!], storeDir)).toBe(y);
    expect(makeTextPath('a', sha256('b'))).not.toBe(a!.replace(storeDir, '/nix/store'));
    expect(() => makeTextPath('y', sha256(`${c}`), [c!])).toThrow(/not in the Nix store \/nix\/store/);
  });
});

describe('content addresses', () => {
  it('renders and parses the forms of §1.3', () => {
    const cases: Array<[ContentAddressMethod, Hash, string]> = [
      ['text', HELLO_FLAT, 'text:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq'],
      ['flat', HELLO_FLAT, 'fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq'],
      ['recursive', HELLO_NAR, 'fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw'],
      ['git', hashBytes('sha1', 'x'), `fixed:git:sha1:${hashBytes('sha1', 'x').toNix32()}`],
      ['flat', hashBytes('md5', 'x'), `fixed:md5:${hashBytes('md5', 'x').toNix32()}`],
    ];
    for (const [method, hash, s] of cases) {
      expect(renderContentAddress({ method, hash })).toBe(s);
      const p = parseContentAddress(s);
      expect(p.method).toBe(method);
      expect(p.hash.equals(hash)).toBe(true);
    }
    // a base16 hash is accepted too
    expect(parseContentAddress(`fixed:r:sha256:${HELLO_NAR.toBase16()}`).hash.equals(HELLO_NAR)).toBe(true);
    for (const [s, re] of [
      ['', /must start with/],
      ['fixed', /names no hash algorithm/],
      ['fixed:r:sha256', /has no hash/],
      ['fixed:r:sha3:abc', /unknown hash algorithm 'sha3'/],
      ['text:sha1:abc', /requires sha256/],
      ['nar:sha256:abc', /must start with 'text:' or 'fixed:'/],
      ['fixed:sha256:abc', /wrong length/],
    ] as const) {
      expect(() => parseContentAddress(s), s).toThrow(re);
    }
  });

  it('renders and parses method strings', () => {
    for (const s of ['text:sha256', 'fixed:sha256', 'fixed:r:sha256', 'fixed:r:sha1', 'fixed:git:sha1', 'fixed:md5']) {
      const m = parseContentAddressMethod(s);
      expect(renderContentAddressMethod(m.method, m.algo)).toBe(s);
    }
    expect(() => parseContentAddressMethod('fixed:r:sha256:abc')).toThrow(/invalid content-address method/);
    for (const s of ['sha256', 'r:sha256', 'text:sha256', 'git:sha1', 'r:md5']) {
      const m = parseMethodAlgo(s);
      expect(renderMethodAlgo(m.method, m.algo)).toBe(s);
    }
    expect(parseMethodAlgo('r:sha1')).toEqual({ method: 'recursive', algo: 'sha1' });
    expect(() => parseMethodAlgo('x:sha256')).toThrow(/invalid output hash method\/algorithm 'x:sha256'/);
    expect(DEFAULT_STORE_DIR).toBe('/nix/store');
  });
});
