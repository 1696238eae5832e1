/**
 * The store against real Nix 2.8 fixtures: paths added with `nix-store --add[-fixed]` and built with `nix-build`, their
 * NARs from `nix-store --dump`, path info from `nix path-info --json`, signatures from `nix store sign`.
 */
import {
  chmodSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readFileSync,
  readlinkSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Hash } from '../src/hash.js';
import { narHashPath } from '../src/nar.js';
import { loadPublicKey, SecretKey, signPathInfo, verifyPathInfoSignatures } from '../src/signing.js';
import { HashMismatchError, type NewPathInfo, Store, StoreError, type StoreOptions } from '../src/store.js';
import { tempDir } from './helpers/exec.js';
import { nix28 } from './helpers/nix.js';
import { collect, listDir, newInfoOf, readerOf } from './helpers/store-env.js';
import {
  addFile,
  buildWithRefs,
  type NixPathInfo,
  nixAdd,
  nixDump,
  nixPathInfo,
  uniqueTag,
} from './helpers/store-fixtures.js';

interface Fixture {
  info: NixPathInfo;
  nar: Buffer;
}

async function fixture(path: string, sigs = false): Promise<Fixture> {
  return { info: await nixPathInfo(path, sigs), nar: await nixDump(path) };
}

let work: { path: string; cleanup: () => void };
/** A single file, content-addressed (source). */
let A: Fixture;
/** A directory tree with an executable, a symlink and a subdirectory (source). */
let T: Fixture;
/** Built, input-addressed, references A. */
let B: Fixture;
/** Built, references B. */
let C: Fixture;
/** B's derivation (text-addressed, references A). */
let Bdrv: Fixture;
/** Unrelated small file whose content differs from A's. */
let X: Fixture;
/** Flat sha256 and recursive sha1 fixed paths. */
let FLAT: Fixture;
let RSHA1: Fixture;
/** A key made by Nix; A, B and C carry its signatures (from `nix store sign`). */
let nixKeyPub: string;
let signedA: Fixture;
let signedB: Fixture;

beforeAll(async () => {
  work = tempDir('buildbox-store-');
  const tag = uniqueTag();
  A = await fixture(await addFile(work.path, 'a.txt', `content of a ${tag}\n`));
  const tree = join(work.path, `tree-${tag}`);
  mkdirSync(join(tree, 'sub', 'deeper'), { recursive: true });
  writeFileSync(join(tree, 'sub', 'deeper', 'file'), `deep ${tag}\n`);
  writeFileSync(join(tree, 'run.sh'), '#!/bin/sh\necho hi\n');
  chmodSync(join(tree, 'run.sh'), 0o755);
  writeFileSync(join(tree, 'empty'), '');
  symlinkSync('sub/deeper/file', join(tree, 'link'));
  T = await fixture(await nixAdd(tree));
  B = await fixture(await buildWithRefs(work.path, 'b', `b ${tag}`, [A.info.path]));
  C = await fixture(await buildWithRefs(work.path, 'c', `c ${tag}`, [B.info.path]));
  Bdrv = await fixture(B.info.deriver!);
  X = await fixture(await addFile(work.path, 'x.txt', `something else ${tag}\n`));
  const flatFile = join(work.path, `flat-${tag}.txt`);
  writeFileSync(flatFile, `flat ${tag}\n`);
  FLAT = await fixture((await nix28('nix-store', ['--add-fixed', 'sha256', flatFile])).stdout.trim());
  RSHA1 = await fixture((await nix28('nix-store', ['--add-fixed', '--recursive', 'sha1', flatFile])).stdout.trim());

  const sec = join(work.path, 'nix.sec');
  const pub = join(work.path, 'nix.pub');
  await nix28('nix-store', ['--generate-binary-cache-key', `test-cache-${tag}-1`, sec, pub]);
  nixKeyPub = loadPublicKey(pub).toString();
  await nix28('nix', ['store', 'sign', '--key-file', sec, A.info.path, B.info.path, C.info.path]);
  signedA = await fixture(A.info.path, true);
  signedB = await fixture(B.info.path, true);
});

afterAll(() => work?.cleanup());

const opened: Store[] = [];
afterEach(() => {
  for (const s of opened.splice(0)) s.close();
});

function openStore(extra: Partial<StoreOptions> = {}, stateDir?: string): Store {
  const s = Store.open({
    stateDir: stateDir ?? join(work.path, `state-${uniqueTag()}`),
    persist: false,
    trustedPublicKeys: [nixKeyPub],
    ...extra,
  });
  opened.push(s);
  return s;
}

function add(store: Store, user: string, f: Fixture, extra: Partial<NewPathInfo> = {}, chunk = 4096) {
  return store.addToStoreNar(user, newInfoOf(f.info, extra), readerOf(f.nar, { chunk }));
}

/** A store with alice's A, B (→ A), C (→ B) and X, and bob's T. */
async function filled(inlineMaxNar?: number): Promise<Store> {
  const store = openStore({ inlineMaxNar });
  for (const f of [A, B, C, X]) await add(store, 'alice', f);
  await add(store, 'bob', T);
  return store;
}

/** Snapshot of everything on disk and in the database that a failed import must not change. */
function snapshot(store: Store) {
  return { objects: listDir(store.objectsDir), tmp: listDir(store.tmpDir), stats: store.stats() };
}

/** The two ways the store keeps an object: small ones inline in the database (the default), or extracted on disk. */
const STORAGE: Array<[string, number | undefined]> = [
  ['inline', undefined],
  ['on disk', 0],
];

describe('import, query, export', () => {
  it('imports NARs from nix-store --dump and reports the same path info as Nix', async () => {
    const store = openStore();
    const info = await add(store, 'alice', A);
    expect(info.path).toBe(A.info.path);
    expect(info.narHash.toSRI()).toBe(A.info.narHash);
    expect(info.narSize).toBe(A.info.narSize);
    expect(info.references).toEqual([]);
    expect(info.ca).toBe(A.info.ca);
    expect(info.scope).toBe('alice');
    expect(info.sigs).toEqual([]);
    expect(info.ultimate).toBe(false);
    expect(store.queryPathInfo('alice', A.info.path)).toEqual(info);
    expect(store.isValidPath('alice', A.info.path)).toBe(true);

    const b = await add(store, 'alice', B);
    expect(b.references).toEqual([A.info.path]);
    expect(b.deriver).toBe(B.info.deriver);
    expect(b.ca).toBeNull();
    expect(b.registrationTime).toBe(B.info.registrationTime);

    // Small objects stay in the database until a build needs them on disk: realPath extracts them (once).
    const [hashA, hashB] = [A.info, B.info].map((i) => Hash.parseAnyPrefixed(i.narHash).toNix32());
    expect(listDir(store.objectsDir)).toEqual([]);
    expect(await collect(store.narFromPath('alice', A.info.path))).toEqual(A.nar);
    expect(await collect(store.narFromPath('alice', B.info.path))).toEqual(B.nar);
    const [realA, again] = await Promise.all([
      store.realPath('alice', A.info.path),
      store.realPath('alice', A.info.path),
    ]);
    expect(realA).toBe(join(store.objectsDir, hashA!));
    expect(again).toBe(realA);
    expect(readFileSync(realA!, 'utf8')).toMatch(/^content of a /);
    expect(lstatSync(realA!).mode & 0o7777).toBe(0o444);
    expect(lstatSync(realA!).mtimeMs).toBe(1000);
    expect(listDir(store.objectsDir)).toEqual([hashA]);
    expect(await store.realPath('alice', B.info.path)).toBe(join(store.objectsDir, hashB!));
    expect(listDir(store.objectsDir)).toEqual([hashA, hashB].sort());
    // The exported NAR is byte-identical to Nix's either way.
    expect(await collect(store.narFromPath('alice', A.info.path))).toEqual(A.nar);
    expect(store.readRegularFile('alice', A.info.path, 1 << 20)!.toString()).toMatch(/^content of a /);
    expect(listDir(store.tmpDir)).toEqual([]);
    expect(store.stats()).toMatchObject({ objects: 2, paths: 2, pathsByScope: { alice: 2 } });
    expect(store.stats().bytes).toBe(A.info.narSize + B.info.narSize);
  });

  it('extracts directory trees with canonical metadata and exports them unchanged', async () => {
    const store = openStore();
    await add(store, 'alice', T, {}, 7); // odd chunk size: every token boundary is crossed
    const root = (await store.realPath('alice', T.info.path))!;
    expect(lstatSync(root).mode & 0o7777).toBe(0o555);
    expect(lstatSync(join(root, 'run.sh')).mode & 0o7777).toBe(0o555);
    expect(lstatSync(join(root, 'empty')).mode & 0o7777).toBe(0o444);
    expect(lstatSync(join(root, 'sub', 'deeper', 'file')).mtimeMs).toBe(1000);
    expect(readlinkSync(join(root, 'link'))).toBe('sub/deeper/file');
    expect(await collect(store.narFromPath('alice', T.info.path))).toEqual(T.nar);
    expect((await narHashPath(root)).narSize).toBe(T.info.narSize);
  });

  it('answers hash-part, valid-paths, closure, referrers and derivation-output queries', async () => {
    const store = openStore();
    for (const f of [A, Bdrv, B, C, X]) await add(store, 'alice', f);
    expect(store.queryPathFromHashPart('alice', B.info.path.slice(11, 43))).toBe(B.info.path);
    expect(store.queryPathFromHashPart('alice', 'x'.repeat(32))).toBeUndefined();
    expect(
      store.queryValidPaths('alice', [C.info.path, `/nix/store/${'0'.repeat(32)}-nope`, 'garbage', A.info.path]),
    ).toEqual([C.info.path, A.info.path]);
    expect(store.queryClosure('alice', [C.info.path])).toEqual([A.info.path, B.info.path, C.info.path].sort());
    expect(store.queryClosure('alice', [A.info.path, X.info.path])).toEqual([A.info.path, X.info.path].sort());
    // The derivation's closure holds its inputs; with includeOutputs, also its outputs' closures.
    expect(Bdrv.info.references).toEqual([A.info.path]);
    expect(store.queryClosure('alice', [Bdrv.info.path])).toEqual([A.info.path, Bdrv.info.path].sort());
    expect(store.queryClosure('alice', [Bdrv.info.path], true)).toEqual(
      [A.info.path, Bdrv.info.path, B.info.path].sort(),
    );
    expect(store.queryDerivationOutputs('alice', Bdrv.info.path)).toEqual([B.info.path]);
    expect(store.queryReferrers('alice', A.info.path)).toEqual([Bdrv.info.path, B.info.path].sort());
    expect(() => store.queryClosure('alice', [`/nix/store/${'0'.repeat(32)}-nope`])).toThrow(/is not valid/);

    // Outputs are found from the .drv itself even when the uploaded output names no deriver.
    const s2 = openStore();
    for (const f of [A, Bdrv]) await add(s2, 'bob', f);
    await add(s2, 'bob', B, { deriver: null });
    expect(s2.queryDerivationOutputs('bob', Bdrv.info.path)).toEqual([B.info.path]);
    expect(s2.queryClosure('bob', [Bdrv.info.path], true)).toEqual([A.info.path, Bdrv.info.path, B.info.path].sort());
    // A deriver claim is not signed: alice cannot attach her public upload to bob's derivation.
    const s3 = openStore();
    await add(s3, 'alice', signedA, { deriver: Bdrv.info.path });
    await add(s3, 'bob', Bdrv);
    expect(s3.queryPathInfo('bob', A.info.path)).toMatchObject({ scope: 'public', deriver: Bdrv.info.path });
    expect(s3.queryDerivationOutputs('bob', Bdrv.info.path)).toEqual([]);
    expect(s3.queryClosure('bob', [Bdrv.info.path], true)).toEqual([A.info.path, Bdrv.info.path].sort());
    expect(() => store.narFromPath('alice', `/nix/store/${'0'.repeat(32)}-nope`)).toThrow(StoreError);
  });

  it('accepts references within the same batch', async () => {
    const store = openStore();
    const batch = new Set([A.info.path, B.info.path]);
    await expect(add(store, 'alice', B)).rejects.toThrow(/reference .* is not valid/);
    const info = await store.addToStoreNar('alice', newInfoOf(B.info), readerOf(B.nar), { batch });
    expect(info.references).toEqual([A.info.path]);
    await add(store, 'alice', A);
    expect(store.queryClosure('alice', [B.info.path])).toEqual([A.info.path, B.info.path].sort());
  });
});

describe('views and scopes', () => {
  it("keeps alice's unsigned upload invisible to bob; each sees their own content at the same path", async () => {
    const store = openStore();
    await add(store, 'alice', A);
    const p = A.info.path;
    expect(store.isValidPath('bob', p)).toBe(false);
    expect(store.queryPathInfo('bob', p)).toBeUndefined();
    expect(store.queryValidPaths('bob', [p])).toEqual([]);
    expect(store.queryPathFromHashPart('bob', p.slice(11, 43))).toBeUndefined();
    expect(await store.realPath('bob', p)).toBeUndefined();
    expect(() => store.narFromPath('bob', p)).toThrow(/is not valid/);
    expect(() => store.queryClosure('bob', [p])).toThrow(/is not valid/);
    expect(store.queryReferrers('bob', p)).toEqual([]);

    // Bob uploads different content (X's NAR) at A's path.
    const bobInfo = await store.addToStoreNar('bob', newInfoOf(X.info, { path: p, ca: null }), readerOf(X.nar));
    expect(bobInfo.scope).toBe('bob');
    expect(bobInfo.narHash.toSRI()).toBe(X.info.narHash);
    expect(await collect(store.narFromPath('alice', p))).toEqual(A.nar);
    expect(await collect(store.narFromPath('bob', p))).toEqual(X.nar);
    expect(store.queryPathInfo('alice', p)!.narHash.toSRI()).toBe(A.info.narHash);
    expect(store.stats()).toMatchObject({ objects: 2, paths: 2, pathsByScope: { alice: 1, bob: 1 } });
  });

  it('stores the same content uploaded by several users once on disk', async () => {
    const store = openStore({ inlineMaxNar: 0 });
    await add(store, 'alice', A);
    await add(store, 'bob', A);
    await add(store, 'carol', A);
    expect(listDir(store.objectsDir)).toHaveLength(1);
    expect(store.stats()).toMatchObject({ objects: 1, paths: 3, pathsByScope: { alice: 1, bob: 1, carol: 1 } });
    // Same content under another path name is still one object.
    await store.addToStoreNar('dave', newInfoOf(A.info, { path: X.info.path, ca: null }), readerOf(A.nar));
    expect(store.stats()).toMatchObject({ objects: 1, paths: 4 });
    expect(await store.realPath('dave', X.info.path)).toBe(await store.realPath('alice', A.info.path));
    // Uploading what is already valid consumes the NAR and changes nothing.
    const r = readerOf(A.nar);
    await store.addToStoreNar('alice', newInfoOf(A.info), r);
    expect(await r.atEof()).toBe(true);
    expect(store.stats()).toMatchObject({ objects: 1, paths: 4 });
    expect(listDir(store.tmpDir)).toEqual([]);
  });

  it('makes uploads signed by a trusted key (signatures by nix store sign) public', async () => {
    const store = openStore();
    const a = await add(store, 'alice', signedA);
    expect(a.scope).toBe('public');
    expect(a.sigs).toEqual(signedA.info.signatures!.filter((s) => s.startsWith('test-cache-')));
    const b = await add(store, 'alice', signedB);
    expect(b.scope).toBe('public');
    expect(store.queryPathInfo('bob', B.info.path)?.scope).toBe('public');
    expect(await collect(store.narFromPath('bob', B.info.path))).toEqual(B.nar);
    expect(store.queryClosure('bob', [B.info.path])).toEqual([A.info.path, B.info.path].sort());
    // Bob's own upload of the same path is a no-op: it is already valid for him.
    expect((await add(store, 'bob', B)).scope).toBe('public');
    expect(store.stats()).toMatchObject({ objects: 2, paths: 2, pathsByScope: { public: 2 } });
  });

  it('keeps uploads with forged, wrong-key or untrusted signatures private and drops those signatures', async () => {
    const store = openStore();
    const sig = signedA.info.signatures!.find((s) => s.startsWith('test-cache-'))!;
    const [name, b64] = sig.split(':') as [string, string];
    const bytes = Buffer.from(b64, 'base64');
    bytes[5] = bytes[5]! ^ 0x40;
    const forged = `${name}:${bytes.toString('base64')}`;
    const wrongKey = signPathInfo(
      { ...newInfoOf(A.info), narHash: Hash.parseAnyPrefixed(A.info.narHash) },
      SecretKey.generate(name),
    );
    for (const [user, s] of [
      ['u1', forged],
      ['u2', wrongKey],
      ['u3', 'cache.example.org-1:AAAA'],
    ] as const) {
      const info = await add(store, user, A, { sigs: [s] });
      expect(info.scope).toBe(user);
      expect(info.sigs).toEqual([]);
      expect(store.isValidPath('bob', A.info.path)).toBe(false);
    }
    // A correct signature, but on info that was altered: other references break it, another deriver does not (it is
    // not part of the fingerprint).
    const other = openStore();
    await add(other, 'alice', signedA);
    expect((await add(other, 'alice', signedB, { references: [] })).scope).toBe('alice');
    expect((await add(other, 'bob', signedB, { deriver: null })).scope).toBe('public');
  });

  it('keeps a signed path private while its references are not public', async () => {
    const store = openStore();
    await add(store, 'alice', A); // unsigned, private
    const b = await add(store, 'alice', signedB);
    expect(b.scope).toBe('alice');
    expect(store.isValidPath('bob', B.info.path)).toBe(false);
    // Once A is public (signed upload), a new signed upload of B becomes public.
    await add(store, 'alice', signedA);
    expect(store.queryPathInfo('alice', A.info.path)?.scope).toBe('public');
    expect((await add(store, 'alice', signedB)).scope).toBe('public');
    expect(store.isValidPath('bob', B.info.path)).toBe(true);
    // Alice's redundant private copies are gone; the object stayed single.
    expect(store.stats()).toMatchObject({ objects: 2, pathsByScope: { public: 2 } });
  });

  it.each(STORAGE)(
    'shares content-addressed uploads only when configured, after checking the content address (%s)',
    async (_, inlineMaxNar) => {
      const off = openStore({ inlineMaxNar });
      expect((await add(off, 'alice', A)).scope).toBe('alice');
      const on = openStore({ shareContentAddressed: true, inlineMaxNar });
      for (const f of [A, T, FLAT, RSHA1, Bdrv]) {
        const info = await add(on, 'alice', f);
        expect(info.scope, f.info.path).toBe('public');
        expect(info.ca).toBe(f.info.ca);
        expect(on.isValidPath('bob', f.info.path)).toBe(true);
      }
      expect(FLAT.info.ca).toMatch(/^fixed:sha256:/);
      expect(RSHA1.info.ca).toMatch(/^fixed:r:sha1:/);
      expect(Bdrv.info.ca).toMatch(/^text:sha256:/);
      // Input-addressed paths are not shared by this rule.
      expect((await add(on, 'alice', B)).scope).toBe('alice');
      // A content address that does not match the contents is refused.
      const before = snapshot(on);
      await expect(on.addToStoreNar('bob', newInfoOf(X.info, { ca: A.info.ca }), readerOf(X.nar))).rejects.toThrow(
        /content address mismatch importing path/,
      );
      await expect(
        on.addToStoreNar('bob', newInfoOf(X.info, { path: A.info.path.replace('-a.txt', '-z.txt') }), readerOf(X.nar)),
      ).rejects.toThrow(HashMismatchError);
      expect(snapshot(on)).toEqual(before);
    },
  );
});

describe.each(STORAGE)('failed imports register nothing and leave no files (%s)', (_, inlineMaxNar) => {
  async function expectNoTrace(store: Store, attempt: () => Promise<unknown>, message: RegExp) {
    const before = snapshot(store);
    await expect(attempt()).rejects.toThrow(message);
    expect(snapshot(store)).toEqual(before);
    expect(store.isValidPath('alice', B.info.path)).toBe(false);
  }

  it('hash mismatch', async () => {
    const store = openStore({ inlineMaxNar });
    await add(store, 'alice', A);
    const wrong = Hash.parseAnyPrefixed(X.info.narHash);
    await expectNoTrace(
      store,
      () => store.addToStoreNar('alice', newInfoOf(B.info, { narHash: wrong }), readerOf(B.nar)),
      new RegExp(
        `^hash mismatch importing path '${B.info.path}': declared ${wrong.toString('nix32')}, got ${Hash.parseAnyPrefixed(B.info.narHash).toString('nix32')}$`,
      ),
    );
  });

  it('size mismatch (declared larger and declared smaller)', async () => {
    const store = openStore({ inlineMaxNar });
    await add(store, 'alice', A);
    await expectNoTrace(
      store,
      () => store.addToStoreNar('alice', newInfoOf(B.info, { narSize: B.info.narSize + 8 }), readerOf(B.nar)),
      /size mismatch importing path .*declared \d+ bytes, got \d+/,
    );
    await expectNoTrace(
      store,
      () => store.addToStoreNar('alice', newInfoOf(B.info, { narSize: B.info.narSize - 8 }), readerOf(B.nar)),
      /cannot import path/,
    );
  });

  it('truncated stream and garbage', async () => {
    const store = openStore({ inlineMaxNar });
    await add(store, 'alice', A);
    for (const cutAt of [0, 10, 100, B.nar.length - 1]) {
      await expectNoTrace(
        store,
        () => store.addToStoreNar('alice', newInfoOf(B.info), readerOf(B.nar, { cutAt, chunk: 16 })),
        /cannot import path .*unexpected end of stream/,
      );
    }
    const garbage = Buffer.alloc(B.nar.length, 0x41);
    await expectNoTrace(
      store,
      () => store.addToStoreNar('alice', newInfoOf(B.info), readerOf(garbage)),
      /cannot import path/,
    );
    // A truncated directory tree, cut deep inside.
    await expectNoTrace(
      store,
      () => store.addToStoreNar('alice', newInfoOf(T.info), readerOf(T.nar, { cutAt: T.nar.length - 40, chunk: 32 })),
      /unexpected end of stream/,
    );
    expect(store.isValidPath('alice', T.info.path)).toBe(false);
  });

  it('invalid reference, invalid path', async () => {
    const store = openStore({ inlineMaxNar });
    await add(store, 'bob', A); // valid for bob, not for alice
    await expectNoTrace(
      store,
      () => add(store, 'alice', B),
      /cannot import path .*its reference '.*-a\.txt' is not valid/,
    );
    await expectNoTrace(
      store,
      () => store.addToStoreNar('alice', newInfoOf(B.info, { path: '/tmp/evil' }), readerOf(B.nar)),
      /invalid path info/,
    );
    await expectNoTrace(
      store,
      () => store.addToStoreNar('alice', newInfoOf(B.info, { references: ['/nix/store/../etc'] }), readerOf(B.nar)),
      /invalid path info/,
    );
  });
});

describe('small objects kept inline', () => {
  const hashOf = (f: Fixture) => Hash.parseAnyPrefixed(f.info.narHash).toNix32();

  it('keeps NARs up to the limit in the database and extracts bigger ones at import', async () => {
    expect(A.info.narSize).toBeLessThan(T.info.narSize);
    const store = openStore({ inlineMaxNar: A.info.narSize });
    await add(store, 'alice', A);
    await add(store, 'alice', T);
    // T (one byte over the limit or more) was extracted at import; A is not on disk until a build needs it.
    expect(listDir(store.objectsDir)).toEqual([hashOf(T)]);
    expect(await collect(store.narFromPath('alice', A.info.path))).toEqual(A.nar);
    expect(await collect(store.narFromPath('alice', T.info.path))).toEqual(T.nar);
    expect(store.stats()).toMatchObject({ objects: 2, inlineObjects: 1, bytes: A.info.narSize + T.info.narSize });
  });

  it('extracts a directory tree on demand with canonical metadata, identical to an import on disk', async () => {
    const store = openStore();
    await add(store, 'alice', T);
    expect(listDir(store.objectsDir)).toEqual([]);
    const root = (await store.realPath('alice', T.info.path))!;
    expect(lstatSync(root).mode & 0o7777).toBe(0o555);
    expect(await narHashPath(root)).toEqual({
      narHash: Hash.parseAnyPrefixed(T.info.narHash).digest,
      narSize: T.info.narSize,
    });
    expect(listDir(store.tmpDir)).toEqual([]);
    expect(await store.realPath('bob', T.info.path)).toBeUndefined();
  });

  it('reads a regular file without extracting it, and refuses what is not one or is too large', async () => {
    const store = openStore();
    await add(store, 'alice', A);
    await add(store, 'alice', T);
    expect(store.readRegularFile('alice', A.info.path, 1024)!.toString()).toMatch(/^content of a /);
    expect(store.readRegularFile('bob', A.info.path, 1024)).toBeUndefined();
    expect(() => store.readRegularFile('alice', T.info.path, 1024)).toThrow(/is not a regular file/);
    expect(() => store.readRegularFile('alice', A.info.path, 4)).toThrow(/is too large \(\d+ bytes, at most 4\)/);
    expect(listDir(store.objectsDir)).toEqual([]);
  });

  it('collects inline objects, whether a build extracted them or not', async () => {
    const store = await filled();
    await store.realPath('alice', C.info.path); // on disk now too
    store.addTempRoot('session-1', B.info.path); // holds B and A
    const res = await store.gc({ retentionSeconds: 60, now: Math.floor(Date.now() / 1000) + 3600 });
    expect(res).toMatchObject({ deletedPaths: 3, deletedObjects: 3, keptPaths: 2 });
    expect(listDir(store.objectsDir)).toEqual([]);
    expect(listDir(store.tmpDir)).toEqual([]);
    expect(await collect(store.narFromPath('alice', B.info.path))).toEqual(B.nar);
    expect(await store.realPath('alice', A.info.path)).toBe(join(store.objectsDir, hashOf(A)));
  });

  it('keeps inline objects across a persistent restart, and upgrades a store from before them', async () => {
    const stateDir = join(work.path, `persist-${uniqueTag()}`);
    const s1 = Store.open({ stateDir, persist: true, trustedPublicKeys: [], inlineMaxNar: 0 });
    await add(s1, 'alice', T);
    s1.close();
    // The previous schema (version 1) had no inline table.
    const db = new Database(join(stateDir, 'store', 'db.sqlite'));
    db.exec('DROP TABLE inline_nars');
    db.pragma('user_version = 1');
    db.close();
    const s2 = Store.open({ stateDir, persist: true, trustedPublicKeys: [] });
    expect(s2.isValidPath('alice', T.info.path)).toBe(true);
    await add(s2, 'alice', A);
    s2.close();
    const s3 = Store.open({ stateDir, persist: true, trustedPublicKeys: [] });
    opened.push(s3);
    expect(s3.stats()).toMatchObject({ objects: 2, paths: 2 });
    expect(listDir(s3.objectsDir)).toEqual([hashOf(T)]);
    expect(await collect(s3.narFromPath('alice', A.info.path))).toEqual(A.nar);
    expect(await collect(s3.narFromPath('alice', T.info.path))).toEqual(T.nar);
    expect(readFileSync((await s3.realPath('alice', A.info.path))!, 'utf8')).toMatch(/^content of a /);
  });
});

describe('concurrency', () => {
  it.each(STORAGE.map(([what, max]) => [what, max, max === 0 ? 1 : 0] as const))(
    'imports the same content concurrently from many sessions exactly once (%s)',
    async (_, inlineMaxNar, files) => {
      const store = openStore({ inlineMaxNar });
      const users = ['alice', 'bob', 'alice', 'carol', 'bob', 'alice'];
      const results = await Promise.all(
        users.map((u) => store.addToStoreNar(u, newInfoOf(T.info), readerOf(T.nar, { chunk: 64, delayMs: 1 }))),
      );
      for (const r of results) expect(r.narHash.toSRI()).toBe(T.info.narHash);
      expect(listDir(store.objectsDir)).toHaveLength(files);
      expect(listDir(store.tmpDir)).toEqual([]);
      expect(store.stats()).toMatchObject({ objects: 1, paths: 3, pathsByScope: { alice: 1, bob: 1, carol: 1 } });
      expect(await collect(store.narFromPath('carol', T.info.path))).toEqual(T.nar);
    },
  );

  it('keeps the first of concurrent uploads of different content at one path', async () => {
    const store = openStore();
    const [r1, r2] = await Promise.all([
      store.addToStoreNar('alice', newInfoOf(A.info), readerOf(A.nar, { chunk: 8, delayMs: 1 })),
      store.addToStoreNar(
        'alice',
        newInfoOf(X.info, { path: A.info.path, ca: null }),
        readerOf(X.nar, { chunk: 8, delayMs: 1 }),
      ),
    ]);
    expect(r1.narHash.equals(r2.narHash)).toBe(true);
    expect(store.stats()).toMatchObject({ objects: 1, paths: 1 });
    expect(listDir(store.tmpDir)).toEqual([]);
  });
});

describe('persistence', () => {
  it('wipes objects and database at open unless persist is set', async () => {
    const stateDir = join(work.path, `persist-${uniqueTag()}`);
    const s1 = Store.open({ stateDir, persist: false, trustedPublicKeys: [], inlineMaxNar: 0 });
    await add(s1, 'alice', A);
    await add(s1, 'alice', T);
    s1.close();
    const s2 = Store.open({ stateDir, persist: true, trustedPublicKeys: [] });
    expect(s2.stats()).toMatchObject({ objects: 2, paths: 2 });
    expect(await collect(s2.narFromPath('alice', T.info.path))).toEqual(T.nar);
    // A stray object directory (an import interrupted by a crash) is removed at the next persistent open.
    mkdirSync(join(s2.objectsDir, 'stray'));
    writeFileSync(join(s2.tmpDir, 'leftover'), 'x');
    s2.close();
    const s3 = Store.open({ stateDir, persist: true, trustedPublicKeys: [] });
    expect(listDir(s3.objectsDir)).toHaveLength(2);
    expect(listDir(s3.tmpDir)).toEqual([]);
    s3.close();
    const s4 = Store.open({ stateDir, persist: false, trustedPublicKeys: [] });
    opened.push(s4);
    expect(s4.stats()).toMatchObject({ objects: 0, paths: 0 });
    expect(listDir(s4.objectsDir)).toEqual([]);
    expect(s4.isValidPath('alice', A.info.path)).toBe(false);
  });

  it('commits grouped imports on its timer and at close; a failed import in a group rolls back alone', async () => {
    const stateDir = join(work.path, `persist-${uniqueTag()}`);
    const s1 = Store.open({ stateDir, persist: false, trustedPublicKeys: [] });
    await add(s1, 'alice', A);
    await new Promise((r) => setTimeout(r, 250)); // the group of A is committed by now
    await add(s1, 'alice', B);
    await expect(
      s1.addToStoreNar('alice', newInfoOf(C.info, { narHash: Hash.parseAnyPrefixed(X.info.narHash) }), readerOf(C.nar)),
    ).rejects.toThrow(HashMismatchError);
    await add(s1, 'bob', T);
    s1.close(); // commits the group of B and T
    const s2 = Store.open({ stateDir, persist: true, trustedPublicKeys: [] });
    opened.push(s2);
    expect(s2.queryValidPaths('alice', [A.info.path, B.info.path, C.info.path])).toEqual([A.info.path, B.info.path]);
    expect(s2.isValidPath('bob', T.info.path)).toBe(true);
    expect(s2.stats()).toMatchObject({ objects: 3, paths: 3 });
  });

  it('drops rows whose object vanished, with their referrers, at a persistent open', async () => {
    const stateDir = join(work.path, `persist-${uniqueTag()}`);
    const s1 = Store.open({ stateDir, persist: false, trustedPublicKeys: [], inlineMaxNar: 0 });
    for (const f of [A, B, C, X]) await add(s1, 'alice', f);
    const objA = (await s1.realPath('alice', A.info.path))!;
    s1.close();
    chmodSync(join(objA, '..'), 0o755);
    const { rmSync } = await import('node:fs');
    rmSync(objA, { force: true });
    const s2 = Store.open({ stateDir, persist: true, trustedPublicKeys: [] });
    opened.push(s2);
    expect(s2.queryValidPaths('alice', [A.info.path, B.info.path, C.info.path, X.info.path])).toEqual([X.info.path]);
    expect(s2.stats()).toMatchObject({ objects: 1, paths: 1 });
  });
});

describe('build outputs', () => {
  async function makeOutput(store: Store, text: string) {
    const dir = store.buildTmpDir();
    const out = join(dir, 'out');
    writeFileSync(out, text);
    chmodSync(out, 0o444);
    const { narHash, narSize } = await narHashPath(out);
    return { dir, out, narHash: new Hash('sha256', narHash), narSize };
  }

  it('moves outputs into the store, registers them in one go and signs public ones', async () => {
    const box = SecretKey.generate('buildbox-test-1');
    const store = openStore({ signingKey: box });
    await add(store, 'alice', signedA);
    const o1 = await makeOutput(store, `output ${uniqueTag()} ${A.info.path}\n`);
    const path1 = `/nix/store/${'1'.repeat(32)}-out1`;
    const [info] = store.registerOutputs(
      'alice',
      [
        {
          info: {
            path: path1,
            deriver: Bdrv.info.path,
            narHash: o1.narHash,
            narSize: o1.narSize,
            references: [A.info.path],
            ca: null,
          },
          fsPath: o1.out,
        },
      ],
      'public',
    );
    expect(info).toMatchObject({ path: path1, scope: 'public', ultimate: true, deriver: Bdrv.info.path });
    expect(verifyPathInfoSignatures(info!, [box.publicKey])).toBe(true);
    expect(existsSync(o1.out)).toBe(false);
    expect(store.isValidPath('bob', path1)).toBe(true);
    expect(store.queryDerivationOutputs('bob', Bdrv.info.path)).toEqual([path1]);

    // Private outputs: unsigned, alice only; a failing batch (bad reference) registers nothing and moves nothing back.
    const o2 = await makeOutput(store, 'private output\n');
    const path2 = `/nix/store/${'2'.repeat(32)}-out2`;
    const mk = (refs: string[]): NewPathInfo => ({
      path: path2,
      deriver: null,
      narHash: o2.narHash,
      narSize: o2.narSize,
      references: refs,
      ca: null,
    });
    const before = store.stats();
    expect(() => store.registerOutputs('alice', [{ info: mk([X.info.path]), fsPath: o2.out }], 'alice')).toThrow(
      /is not valid/,
    );
    expect(store.stats()).toEqual(before);
    expect(existsSync(o2.out)).toBe(true);
    const [p2] = store.registerOutputs('alice', [{ info: mk([path2]), fsPath: o2.out }], 'alice');
    expect(p2).toMatchObject({ scope: 'alice', sigs: [], references: [path2] });
    expect(store.isValidPath('bob', path2)).toBe(false);
    expect(readFileSync((await store.realPath('alice', path2))!, 'utf8')).toBe('private output\n');
    expect(listDir(store.tmpDir)).toHaveLength(2); // the two build dirs, now empty, are the builder's to remove
    expect(listDir(o1.dir)).toEqual([]);
  });
});

describe('garbage collection', () => {
  const later = () => Math.floor(Date.now() / 1000) + 3600;

  it('keeps the closures of held paths and removes everything else, objects included', async () => {
    const store = await filled(0);
    store.addTempRoot('session-1', B.info.path); // holds B and A
    const res = await store.gc({ retentionSeconds: 60, now: later() });
    expect(res).toMatchObject({ deletedPaths: 3, deletedObjects: 3, keptPaths: 2 });
    expect(store.queryValidPaths('alice', [A.info.path, B.info.path, C.info.path, X.info.path])).toEqual([
      A.info.path,
      B.info.path,
    ]);
    expect(store.isValidPath('bob', T.info.path)).toBe(false);
    expect(listDir(store.objectsDir)).toHaveLength(2);
    expect(listDir(store.tmpDir)).toEqual([]);
    expect(await collect(store.narFromPath('alice', B.info.path))).toEqual(B.nar);
    store.releaseTempRoots('session-1');
    await store.gc({ retentionSeconds: 60, now: later() });
    expect(store.stats()).toMatchObject({ objects: 0, paths: 0 });
    expect(listDir(store.objectsDir)).toEqual([]);
  });

  it('keeps recently used paths (with their closures) within the retention window', async () => {
    const store = await filled();
    const res = await store.gc({ retentionSeconds: 3600 });
    expect(res.deletedPaths).toBe(0);
    expect(store.stats()).toMatchObject({ paths: 5 });
  });

  it('keeps an object another row still uses', async () => {
    const store = openStore({ inlineMaxNar: 0 });
    await add(store, 'alice', A);
    await add(store, 'bob', A);
    store.addTempRoot('s', A.info.path);
    store.dropUser('bob');
    const res = await store.gc({ retentionSeconds: 3600 });
    // bob's row is held by path (a live holder), so it stays too; without the hold it goes, the object stays for alice.
    expect(res.deletedPaths).toBe(0);
    store.releaseTempRoots('s');
    const res2 = await store.gc({ retentionSeconds: 3600 });
    expect(res2).toMatchObject({ deletedPaths: 1, deletedObjects: 0 });
    expect(store.isValidPath('alice', A.info.path)).toBe(true);
    expect(store.isValidPath('bob', A.info.path)).toBe(false);
    expect(listDir(store.objectsDir)).toHaveLength(1);
  });

  it('removes the private objects of users who left the registry', async () => {
    const store = await filled();
    const res = await store.gc({ retentionSeconds: 3600, knownUsers: (u) => u === 'bob' });
    expect(res.deletedPaths).toBe(4);
    expect(store.stats()).toMatchObject({ paths: 1, pathsByScope: { bob: 1 } });
  });

  it('shrinks the retention window to fit maxBytes, never below what is held', async () => {
    const store = await filled();
    store.addTempRoot('s', X.info.path);
    const res = await store.gc({ retentionSeconds: 3600, maxBytes: X.info.narSize });
    expect(store.stats()).toMatchObject({ paths: 1 });
    expect(res.keptBytes).toBe(X.info.narSize);
    expect(store.isValidPath('alice', X.info.path)).toBe(true);
  });

  it('never removes a path while its NAR is being exported', async () => {
    const store = await filled();
    const gen = store.narFromPath('bob', T.info.path);
    const first = await gen.next();
    await store.gc({ retentionSeconds: 0, now: later() });
    expect(store.isValidPath('bob', T.info.path)).toBe(true);
    const rest = await collect(gen);
    expect(Buffer.concat([first.value as Buffer, rest])).toEqual(T.nar);
  });
});
