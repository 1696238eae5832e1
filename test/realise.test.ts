/**
 * Realising derived paths with the real builder (bubblewrap sandbox, static busybox): `.drv` closures made by the real
 * Nix 2.8 (`nix-instantiate`) and uploaded into a real store; verification of the derivation graph (tampered output
 * paths and misplaced `.drv` files are refused before anything runs), dependency order, each derivation built once,
 * shared failures, public + signed outputs of verified builds that another user gets without a rebuild, QueryMissing
 * and the DerivedPath syntax.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Builder, type BuildRequest, type BuildResult, BuildStatus } from '../src/build.js';
import { derivationPath, drvNameFromPath, parseDerivation, printDerivation } from '../src/derivation.js';
import { Hash, sha256 } from '../src/hash.js';
import { silentLogger } from '../src/logger.js';
import { dumpPath, narHashPath } from '../src/nar.js';
import {
  type DerivedPath,
  derivationOutputMap,
  parseDerivedPath,
  queryMissing,
  type RealiseOptions,
  realise,
} from '../src/realise.js';
import { Scheduler } from '../src/scheduler.js';
import type { Session } from '../src/session.js';
import { SecretKey, verifyPathInfoSignatures } from '../src/signing.js';
import { Store } from '../src/store.js';
import { renderContentAddress } from '../src/store-path.js';
import { makeBusyboxTree, openTempDir } from './helpers/build-sandbox.js';
import { nix28 } from './helpers/nix.js';
import { readerOf } from './helpers/store-env.js';
import { nixDump, nixPathInfo, uniqueTag } from './helpers/store-fixtures.js';

const SD = '/nix/store';
let work: { path: string; cleanup: () => void };
let store: Store;
let builder: Builder;
let key: SecretKey;
const built: Array<{ user: string; drvPath: string; verified: boolean }> = [];
let realBuilder: Builder;

/** .drv paths by name, from nix-instantiate. */
const drv: Record<string, string> = {};
let busybox: string;

function session(user: string): Session {
  return {
    id: `test-${user}-${uniqueTag()}`,
    user,
    store,
    builder,
    logger: silentLogger(),
    signal: new AbortController().signal,
  };
}

interface Logs {
  notices: string[];
  started: string[];
  lines: string[];
}

function opts(): RealiseOptions & { logs: Logs } {
  const logs: Logs = { notices: [], started: [], lines: [] };
  return {
    logs,
    options: { maxSilentTime: 0, buildTimeout: 0, maxLogSize: 0 },
    notice: (m) => logs.notices.push(m),
    startBuild: (d) => {
      logs.started.push(d);
      return {
        log: (c) => logs.lines.push(c.toString()),
        notice: (m) => logs.notices.push(m),
        done: () => {},
      };
    },
  };
}

/** Upload a path from the host Nix store into `user`'s view of our store. */
async function upload(user: string, path: string): Promise<void> {
  const info = await nixPathInfo(path);
  const nar = await nixDump(path);
  await store.addToStoreNar(
    user,
    {
      path,
      deriver: null,
      narHash: Hash.parseAnyPrefixed(info.narHash),
      narSize: info.narSize,
      references: [...info.references].sort(),
      ca: info.ca ?? null,
    },
    readerOf(nar),
  );
}

/** Upload a .drv text (which need not exist in the host store) at `path`, as a text-hashed object if `ca`. */
async function uploadDrvText(user: string, path: string, text: string, refs: string[], ca: boolean): Promise<void> {
  const f = join(work.path, `drv-${uniqueTag()}`);
  writeFileSync(f, Buffer.from(text, 'latin1'));
  const sum = await narHashPath(f);
  const parts: Buffer[] = [];
  for await (const c of dumpPath(f)) parts.push(Buffer.from(c));
  await store.addToStoreNar(
    user,
    {
      path,
      deriver: null,
      narHash: new Hash('sha256', sum.narHash),
      narSize: sum.narSize,
      references: [...refs].sort(),
      ca: ca ? renderContentAddress({ method: 'text', hash: sha256(Buffer.from(text, 'latin1')) }) : null,
    },
    readerOf(Buffer.concat(parts)),
  );
}

async function closureOf(path: string): Promise<string[]> {
  return (await nix28('nix-store', ['-qR', path])).stdout.trim().split('\n');
}

beforeAll(async () => {
  work = openTempDir('buildbox-realise-');
  key = SecretKey.generate('buildbox-test-1');
  store = Store.open({
    stateDir: join(work.path, 'state'),
    persist: false,
    trustedPublicKeys: [],
    signingKey: key,
    shareContentAddressed: true,
  });
  realBuilder = new Builder({
    store,
    scheduler: new Scheduler({ maxJobs: 2, uidBase: 31700 }),
    config: {
      system: 'x86_64-linux',
      extraPlatforms: [],
      features: [],
      mandatoryFeatures: [],
      cores: 1,
      logDir: join(work.path, 'state', 'logs'),
      buildDirRoot: join(work.path, 'state', 'builds'),
    },
  });
  builder = {
    build: (req: BuildRequest): Promise<BuildResult> => {
      built.push({ user: req.user, drvPath: req.drvPath, verified: req.verified });
      return realBuilder.build(req);
    },
  } as unknown as Builder;

  const tag = uniqueTag();
  const bbDir = join(work.path, 'bb');
  makeBusyboxTree(bbDir);
  const expr = join(work.path, 'graph.nix');
  writeFileSync(
    expr,
    `let
  bb = builtins.path { path = ${bbDir}; name = "busybox"; };
  mk = name: script: extra: derivation ({
    inherit name;
    system = "x86_64-linux";
    builder = "\${bb}/bin/sh";
    PATH = "\${bb}/bin";
    args = [ "-c" script ];
    tag = "${tag}";
  } // extra);
  a = mk "a" "echo a-out > $out; echo a-lib > $lib" { outputs = [ "out" "lib" ]; };
  b = mk "b" "cat \${a}/. 2>/dev/null; cat \${a} \${a.lib} > $out; echo built b" {};
  fail = mk "fail" "echo about to fail; exit 1" {};
  c = mk "c" "cat \${fail} > $out" {};
in { inherit a b fail c; bb = "\${bb}"; }
`,
  );
  for (const name of ['a', 'b', 'fail', 'c']) {
    drv[name] = (await nix28('nix-instantiate', [expr, '-A', name])).stdout.trim();
  }
  busybox = JSON.parse((await nix28('nix-instantiate', ['--eval', '--read-write-mode', expr, '-A', 'bb'])).stdout);
  // The .drv closures, uploaded by alice in dependency order (busybox first).
  const paths = new Set<string>();
  for (const name of ['b', 'c']) for (const p of await closureOf(drv[name]!)) paths.add(p);
  const refs = new Map<string, string[]>();
  for (const p of paths)
    refs.set(
      p,
      (await nixPathInfo(p)).references.filter((r) => r !== p),
    );
  const done = new Set<string>();
  while (done.size < paths.size) {
    for (const p of paths) {
      if (done.has(p) || !refs.get(p)!.every((r) => done.has(r))) continue;
      await upload('alice', p);
      done.add(p);
    }
  }
});

afterAll(async () => {
  await realBuilder?.close();
  store?.close();
  work?.cleanup();
});

describe('parseDerivedPath', () => {
  const d = '/nix/store/i4b82g2jyda4ixk9yf4w8ajlmzwmh653-a.drv';
  it.each<[string, boolean, Partial<DerivedPath>]>([
    [`${d}!out,lib`, false, { kind: 'built', drvPath: d, outputs: ['lib', 'out'] }],
    [`${d}!*`, false, { kind: 'built', drvPath: d, outputs: '*' }],
    [d, false, { kind: 'opaque', path: d }],
    [d, true, { kind: 'built', drvPath: d, outputs: '*' }],
    [`${d}!out`, true, { kind: 'built', drvPath: d, outputs: ['out'] }],
    ['/nix/store/wvyijbrr1w7gqkdm2h6nzx1k2qccj4a0-a', true, { kind: 'opaque' }],
  ])('%s (legacy %s)', (s, legacy, want) => {
    expect(parseDerivedPath(s, SD, legacy)).toMatchObject({ ...want, raw: s });
  });
  it.each([
    ['/nix/store/wvyijbrr1w7gqkdm2h6nzx1k2qccj4a0-a!out', /is none/],
    [`${d}!out!bin`, /dynamic derivations/],
    [`${d}!bad name`, /invalid output name 'bad name'/],
    ['/etc/passwd', /not in the Nix store/],
  ])('refuses %s', (s, err) => {
    expect(() => parseDerivedPath(s, SD)).toThrow(err);
  });
});

describe('realise with the real builder', () => {
  it('answers QueryMissing before anything is built', () => {
    const m = queryMissing(session('alice'), [
      parseDerivedPath(`${drv.b}!out`, SD),
      parseDerivedPath('/nix/store/00000000000000000000000000000000-nowhere', SD),
    ]);
    expect(m.willBuild).toEqual([drv.a, drv.b].sort());
    expect(m.unknown).toEqual(['/nix/store/00000000000000000000000000000000-nowhere']);
    expect(m.willSubstitute).toEqual([]);
    // A .drv the box does not have is unknown.
    const nodrv = `/nix/store/${'4'.repeat(32)}-x.drv`;
    expect(queryMissing(session('bob'), [parseDerivedPath(`${nodrv}!out`, SD)]).unknown).toEqual([nodrv]);
  });

  it('builds the inputs first, each once, verified; outputs are public and signed by the box', async () => {
    built.length = 0;
    const o = opts();
    const res = await realise(
      session('alice'),
      [parseDerivedPath(`${drv.b}!out`, SD), parseDerivedPath(`${drv.a}!lib`, SD)],
      o,
    );
    expect(built.map((b) => b.drvPath)).toEqual([drv.a, drv.b]);
    expect(built.every((b) => b.verified && b.user === 'alice')).toBe(true);
    expect(o.logs.started).toEqual([drv.a, drv.b]);
    expect(o.logs.lines.join('')).toContain('built b');
    expect(res.map((k) => [k.path, k.result.status])).toEqual([
      [`${drv.b}!out`, BuildStatus.Built],
      [`${drv.a}!lib`, BuildStatus.AlreadyValid],
    ]);
    const bDrv = parseDerivation(readFileSync(drv.b!, 'latin1'), drvNameFromPath(drv.b!));
    const bOut = bDrv.outputs.get('out')!.path;
    const [id, json] = [...res[0]!.result.builtOutputs][0]!;
    expect(id).toMatch(/^sha256:[0-9a-f]{64}!out$/);
    expect(JSON.parse(json!)).toEqual({ dependentRealisations: {}, id, outPath: bOut.slice(11), signatures: [] });
    const info = store.queryPathInfo('bob', bOut)!;
    expect(info.scope).toBe('public');
    expect(verifyPathInfoSignatures(info, [key.publicKey])).toBe(true);
    // The output really is b's: a's two outputs, concatenated.
    expect(readFileSync((await store.realPath('bob', bOut))!, 'utf8')).toBe('a-out\na-lib\n');
  });

  it('does not rebuild for another user, and says so', async () => {
    built.length = 0;
    const o = opts();
    const res = await realise(session('bob'), [parseDerivedPath(`${drv.b}!*`, SD)], o);
    expect(built).toEqual([]);
    expect(res[0]!.result.status).toBe(BuildStatus.AlreadyValid);
    expect(res[0]!.result.builtOutputs.size).toBe(1);
    expect(o.logs.notices).toEqual([
      expect.stringMatching(/already valid on the box \(public, signed by buildbox-test-1\); not rebuilt$/),
    ]);
  });

  it('shares a failure: the failing input is built once and its dependents report DependencyFailed', async () => {
    built.length = 0;
    const o = opts();
    const res = await realise(
      session('alice'),
      [parseDerivedPath(`${drv.c}!out`, SD), parseDerivedPath(`${drv.fail}!out`, SD)],
      o,
    );
    expect(built.map((b) => b.drvPath)).toEqual([drv.fail]);
    expect(res[0]!.result.status).toBe(BuildStatus.DependencyFailed);
    expect(res[0]!.result.errorMsg).toContain(`its dependency '${drv.fail}' failed`);
    expect(res[1]!.result.status).toBe(BuildStatus.PermanentFailure);
    expect(o.logs.lines.join('')).toContain('about to fail');
  });

  it('refuses a derivation whose claimed output path does not hash from its graph, before building anything', async () => {
    const text = readFileSync(drv.b!, 'latin1');
    const d = parseDerivation(text, 'b');
    const real = d.outputs.get('out')!.path;
    const fake = `/nix/store/${'1'.repeat(32)}-b`;
    d.outputs.set('out', { path: fake, methodAlgo: '', hash: '' });
    d.env.set('out', fake);
    const forged = printDerivation(d);
    const forgedPath = derivationPath(d);
    await uploadDrvText('alice', forgedPath, forged, [...d.inputSrcs, ...d.inputDrvs.keys()], true);
    built.length = 0;
    const res = await realise(session('alice'), [parseDerivedPath(`${forgedPath}!out`, SD)], opts());
    expect(built).toEqual([]);
    expect(res[0]!.result.status).toBe(BuildStatus.MiscFailure);
    expect(res[0]!.result.errorMsg).toBe(
      `derivation '${forgedPath}' does not verify: output 'out' is claimed at '${fake}' but hashes to '${real}'; refusing to build it`,
    );
  });

  it('refuses a .drv stored at a path that is not the text path of its contents', async () => {
    const text = readFileSync(drv.a!, 'latin1');
    const wrong = `/nix/store/${'2'.repeat(32)}-a.drv`;
    // Not content-addressed, so it stays carol's alone.
    await uploadDrvText('carol', wrong, text, [busybox], false);
    const res = await realise(session('carol'), [parseDerivedPath(`${wrong}!out`, SD)], opts());
    expect(res[0]!.result.status).toBe(BuildStatus.MiscFailure);
    expect(res[0]!.result.errorMsg).toBe(
      `derivation '${wrong}' does not verify: its contents belong at '${drv.a}'; refusing to build it`,
    );
  });

  it('reports opaque paths and derivations outside the view per path', async () => {
    const wrong = `/nix/store/${'2'.repeat(32)}-a.drv`; // carol's private upload (previous test)
    const missing = `/nix/store/${'3'.repeat(32)}-missing`;
    const res = await realise(
      session('dave'),
      [
        parseDerivedPath(busybox, SD),
        parseDerivedPath(`${wrong}!out`, SD),
        parseDerivedPath(drv.b!, SD),
        parseDerivedPath(missing, SD),
      ],
      opts(),
    );
    expect(res.map((k) => k.result.status)).toEqual([
      BuildStatus.AlreadyValid,
      BuildStatus.MiscFailure,
      BuildStatus.AlreadyValid,
      BuildStatus.MiscFailure,
    ]);
    expect(res[1]!.result.errorMsg).toBe(
      `derivation '${wrong}' is not valid on the box for you; copy the .drv closure first (nix copy --derivation)`,
    );
    expect(res[3]!.result.errorMsg).toMatch(/is not valid on the box, and buildbox does not substitute/);
  });

  it('maps derivation outputs for QueryDerivationOutputMap', () => {
    const m = derivationOutputMap(session('alice'), drv.a!);
    expect([...m.keys()]).toEqual(['lib', 'out']);
    expect(m.get('out')).toMatch(/-a$/);
    expect(m.get('lib')).toMatch(/-a-lib$/);
  });
});
