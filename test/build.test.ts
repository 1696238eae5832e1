/**
 * Builds in real bubblewrap sandboxes with a static busybox, compared with what the real Nix 2.8 builds (sandboxed)
 * from the same derivations: outputs byte-identical, environment as §6.5, failures, limits, sandbox escapes,
 * cancellation and fair scheduling.
 */
import { createHash, randomBytes } from 'node:crypto';
import {
  copyFileSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { createServer, type Server } from 'node:net';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Builder, type BuilderConfig, BuildStatus, LogTail } from '../src/build.js';
import type { BasicDerivation, DerivationOutput } from '../src/derivation.js';
import { Hash } from '../src/hash.js';
import { NIX32_ALPHABET } from '../src/nix32.js';
import { processesOfUid } from '../src/sandbox.js';
import { Scheduler } from '../src/scheduler.js';
import { Store } from '../src/store.js';
import { makeFixedOutputPath } from '../src/store-path.js';
import {
  basicOf,
  describeResult,
  type Instantiated,
  importFromHost,
  instantiate,
  nixRealise,
  request,
} from './helpers/build-fixtures.js';
import { makeBusyboxTree, openTempDir } from './helpers/build-sandbox.js';
import { nix28 } from './helpers/nix.js';
import { collect } from './helpers/store-env.js';
import { nixDump, nixPathInfo } from './helpers/store-fixtures.js';

const SHARED_EXAMPLES = join(import.meta.dirname, '..', '..', 'shared', 'examples');
const CORES = availableParallelism();

let work: { path: string; cleanup: () => void };
let store: Store;
let hello: Instantiated;
let BB: string;
let uidNext = 31100;
const builders: Builder[] = [];
const usedUids: number[] = [];

function newBuilder(
  opts: { maxJobs?: number; config?: Partial<BuilderConfig>; userLimit?: (u: string) => number | undefined } = {},
  s: Store = store,
): { builder: Builder; scheduler: Scheduler; uids: number[] } {
  const maxJobs = opts.maxJobs ?? 2;
  const uidBase = uidNext;
  uidNext += 10;
  const uids = Array.from({ length: maxJobs }, (_, i) => uidBase + i);
  usedUids.push(...uids);
  const scheduler = new Scheduler({ maxJobs, uidBase, userLimit: opts.userLimit });
  const builder = new Builder({
    store: s,
    scheduler,
    config: {
      system: 'x86_64-linux',
      extraPlatforms: [],
      features: ['big-parallel', 'benchmark'],
      mandatoryFeatures: [],
      cores: CORES,
      logDir: join(work.path, 'logs'),
      buildDirRoot: join(work.path, 'builds'),
      ...opts.config,
    },
  });
  builders.push(builder);
  return { builder, scheduler, uids };
}

function randomHashPart(): string {
  const b = randomBytes(32);
  return Array.from(b, (x) => NIX32_ALPHABET[x % 32]).join('');
}

/** A synthetic derivation (as a client would send it) running `script` with busybox's sh. */
function fake(
  name: string,
  script: string,
  opts: { env?: Record<string, string>; outputs?: string[]; fixedSha256?: string; platform?: string } = {},
): { drvPath: string; drv: BasicDerivation } {
  const outputs = new Map<string, DerivationOutput>();
  if (opts.fixedSha256) {
    const hash = Hash.fromBase16('sha256', opts.fixedSha256);
    const path = makeFixedOutputPath(name, { method: 'flat', hash });
    outputs.set('out', { path, methodAlgo: 'sha256', hash: opts.fixedSha256 });
  } else {
    for (const o of opts.outputs ?? ['out']) {
      outputs.set(o, {
        path: `/nix/store/${randomHashPart()}-${name}${o === 'out' ? '' : `-${o}`}`,
        methodAlgo: '',
        hash: '',
      });
    }
  }
  const env = new Map<string, string>([
    ['builder', `${BB}/bin/sh`],
    ['name', name],
    ['system', 'x86_64-linux'],
    ['PATH', `${BB}/bin`],
    ...Object.entries(opts.env ?? {}),
  ]);
  for (const [o, d] of outputs) env.set(o, d.path);
  return {
    drvPath: `/nix/store/${randomHashPart()}-${name}.drv`,
    drv: {
      name,
      outputs,
      inputSrcs: [BB],
      platform: opts.platform ?? 'x86_64-linux',
      builder: `${BB}/bin/sh`,
      args: ['-c', script],
      env: new Map([...env].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))),
    },
  };
}

async function narOf(s: Store, user: string, path: string): Promise<Buffer> {
  return collect(s.narFromPath(user, path));
}

function noProcessesLeft(uids: number[]): void {
  for (const uid of uids) expect(processesOfUid(uid), `processes of uid ${uid}`).toEqual([]);
}

beforeAll(async () => {
  work = openTempDir('buildbox-build-');
  makeBusyboxTree(join(work.path, 'bb'));
  copyFileSync(join(SHARED_EXAMPLES, 'hello-box.nix'), join(work.path, 'hello-box.nix'));
  const r = await nix28('nix-instantiate', [join(work.path, 'hello-box.nix')]);
  const drvPath = r.stdout.trim().split('\n').pop()!;
  const { readDrv } = await import('./helpers/build-fixtures.js');
  hello = { drvPath, drv: readDrv(drvPath) };
  BB = hello.drv.inputSrcs[0]!;
  expect(BB).toMatch(/-busybox$/);
  store = Store.open({ stateDir: join(work.path, 'state'), persist: false, trustedPublicKeys: [] });
  for (const u of ['alice', 'bob']) await importFromHost(store, u, BB);
});

afterAll(async () => {
  await Promise.allSettled(builders.map((b) => b.close()));
  store?.close();
  work?.cleanup();
});

describe('LogTail', () => {
  it('keeps the last lines with Nix line discipline', () => {
    const t = new LogTail(3);
    t.push(Buffer.from('a\nb\nprogress 1\rprogress 2\nc'));
    t.push(Buffer.from('d\ne\n'));
    expect(t.result()).toEqual(['progress 2', 'cd', 'e']);
  });
});

describe('builds compared with the real Nix 2.8', () => {
  it('hello-box: byte-identical output, registered privately, canonical on disk, log kept', async () => {
    const { builder } = newBuilder();
    const basic = basicOf(store, 'alice', hello);
    const rec = request('alice', hello.drvPath, basic);
    const res = await builder.build(rec.req);
    expect(res.status, describeResult(res)).toBe(BuildStatus.Built);
    expect(res.timesBuilt).toBe(1);
    expect(res.errorMsg).toBe('');
    expect(res.stopTime).toBeGreaterThanOrEqual(res.startTime);
    const out = hello.drv.outputs.get('out')!.path;
    const [id, json] = [...res.builtOutputs][0]!;
    expect(id).toMatch(/^sha256:[0-9a-f]{64}!out$/);
    expect(JSON.parse(json)).toEqual({ dependentRealisations: {}, id, outPath: out.slice(11), signatures: [] });

    const real = await nixRealise(hello.drvPath);
    expect(real.get('out')).toBe(out);
    expect((await narOf(store, 'alice', out)).equals(await nixDump(out))).toBe(true);

    const info = store.queryPathInfo('alice', out)!;
    const nixInfo = await nixPathInfo(out);
    expect(info).toMatchObject({
      deriver: hello.drvPath,
      references: nixInfo.references,
      scope: 'alice',
      ultimate: true,
    });
    expect(info.narHash.toSRI()).toBe(nixInfo.narHash);
    expect(store.isValidPath('bob', out)).toBe(false); // legacy build: private to alice

    const onDisk = (await store.realPath('alice', out))!;
    for (const [p, mode] of [
      [onDisk, 0o555],
      [join(onDisk, 'greeting'), 0o444],
    ] as const) {
      const st = statSync(p);
      expect(st.mode & 0o7777).toBe(mode);
      expect(st.mtimeMs).toBe(1000);
      expect(st.uid).toBe(0);
    }

    const logFile = join(work.path, 'logs', 'alice', `${hello.drvPath.slice(11)}.gz`);
    expect(gunzipSync(readFileSync(logFile)).equals(Buffer.concat(rec.logs))).toBe(true);

    // Again: already valid, nothing run.
    const again = await builder.build(request('alice', hello.drvPath, basic).req);
    expect(again.status).toBe(BuildStatus.AlreadyValid);
    expect(again.timesBuilt).toBe(0);
    expect(again.builtOutputs).toEqual(res.builtOutputs);
  });

  it('the environment, /etc, ids, argv[0], fds and passAsFile are exactly those of a sandboxed Nix build', async () => {
    const d = await instantiate(
      work.path,
      'envdump',
      `derivation {
  name = "envdump";
  system = builtins.currentSystem;
  builder = "\${bb}/bin/sh";
  args = [ "-c" "export PATH=\${bb}/bin; mkdir $out; env | sort > $out/env; cat /etc/passwd /etc/group /etc/hosts > $out/etc; id > $out/id; hostname > $out/hostname; echo $0 > $out/argv0; ls /proc/self/fd > $out/fds; cat $fooPath > $out/foo; umask > $out/umask; ls -a /nix/store /build /tmp > $out/dirs; echo $$ > $out/pid" ];
  salt = "${randomBytes(4).toString('hex')}";
  passAsFile = [ "foo" ];
  foo = "bar\\nbaz";
}`,
    );
    const { builder } = newBuilder();
    const res = await builder.build(request('alice', d.drvPath, basicOf(store, 'alice', d)).req);
    expect(res.status, describeResult(res)).toBe(BuildStatus.Built);
    const out = d.drv.outputs.get('out')!.path;
    await nixRealise(d.drvPath);
    const ours = await narOf(store, 'alice', out);
    const env = readFileSync(join((await store.realPath('alice', out))!, 'env'), 'utf8');
    expect(env).toBe(
      [
        'HOME=/homeless-shelter',
        `NIX_BUILD_CORES=${CORES}`,
        'NIX_BUILD_TOP=/build',
        'NIX_LOG_FD=2',
        'NIX_STORE=/nix/store',
        `PATH=${BB}/bin`,
        'PWD=/build',
        'SHLVL=1',
        'TEMP=/build',
        'TEMPDIR=/build',
        'TERM=xterm-256color',
        'TMP=/build',
        'TMPDIR=/build',
        `builder=${BB}/bin/sh`,
        'fooPath=/build/.attr-1bp7cri8hplaz6hbz0v4f0nl44rl84q1sg25kgwqzipzd1mv89ic',
        'name=envdump',
        `out=${out}`,
        'passAsFile=foo',
        `salt=${d.drv.env.get('salt')}`,
        'system=x86_64-linux',
        '',
      ].join('\n'),
    );
    expect(ours.equals(await nixDump(out))).toBe(true);
  });

  it('structured attrs: .attrs.json and .attrs.sh exactly as Nix writes them', async () => {
    const d = await instantiate(
      work.path,
      'sattrs',
      `derivation {
  name = "sa";
  system = builtins.currentSystem;
  builder = "\${bb}/bin/sh";
  __structuredAttrs = true;
  outputs = [ "out" "doc" ];
  list = [ 1 "two" true null ];
  obj = { a = 1; "b c" = "it's"; };
  nested = { x = [ 1 ]; };
  float = 1.5;
  salt = "${randomBytes(4).toString('hex')}";
  exportReferencesGraph = { graph = [ bb ]; };
  args = [ "-c" "export PATH=\${bb}/bin; out=$(sed -n 's/.*\\"out\\":\\"\\\\([^\\"]*\\\\)\\".*/\\\\1/p' /build/.attrs.json); doc=$(sed -n 's/.*\\"doc\\":\\"\\\\([^\\"]*\\\\)\\".*/\\\\1/p' /build/.attrs.json); mkdir $out $doc; cp /build/.attrs.json /build/.attrs.sh $out/; env | grep -v NIX_ATTRS_ | sort > $doc/env; echo $NIX_ATTRS_JSON_FILE $NIX_ATTRS_SH_FILE > /build/files" ];
}`,
    );
    const { builder } = newBuilder();
    const rec = request('alice', d.drvPath, basicOf(store, 'alice', d));
    const res = await builder.build(rec.req);
    expect(res.status, describeResult(res) + rec.log()).toBe(BuildStatus.Built);
    await nixRealise(d.drvPath);
    for (const o of ['out', 'doc']) {
      const p = d.drv.outputs.get(o)!.path;
      expect((await narOf(store, 'alice', p)).equals(await nixDump(p)), o).toBe(true);
    }
    const sh = readFileSync(
      join((await store.realPath('alice', d.drv.outputs.get('out')!.path))!, '.attrs.sh'),
      'utf8',
    );
    expect(sh).toContain("declare -a list=(1 'two' 1 '' )\n");
    expect(sh).toContain("declare -A obj=(['a']=1 ['b c']='it'\\''s' )\n");
  });

  it('multi-output with references, and a chain built from the first build’s output', async () => {
    const tag = randomBytes(4).toString('hex');
    const a = await instantiate(
      work.path,
      'multi',
      `derivation {
  name = "multi";
  system = builtins.currentSystem;
  builder = "\${bb}/bin/sh";
  outputs = [ "out" "dev" ];
  tag = "${tag}";
  args = [ "-c" "export PATH=\${bb}/bin; mkdir -p $out/lib $dev/include; echo lib $tag > $out/lib/file; ln -s \${bb}/bin/busybox $out/lib/bb; echo $out > $dev/include/where; chmod +x $out/lib/file" ];
}`,
    );
    const b = await instantiate(
      work.path,
      'chain',
      `let a = import ./multi.nix; in derivation {
  name = "chain";
  system = builtins.currentSystem;
  builder = "\${bb}/bin/sh";
  args = [ "-c" "\${bb}/bin/busybox cat \${a.dev}/include/where > $out" ];
}`,
    );
    const { builder } = newBuilder();
    const ra = await builder.build(request('alice', a.drvPath, basicOf(store, 'alice', a)).req);
    expect(ra.status, describeResult(ra)).toBe(BuildStatus.Built);
    expect(ra.builtOutputs.size).toBe(2);
    const rb = await builder.build(request('alice', b.drvPath, basicOf(store, 'alice', b)).req);
    expect(rb.status, describeResult(rb)).toBe(BuildStatus.Built);
    await nixRealise(b.drvPath);
    const paths = [...a.drv.outputs.values(), ...b.drv.outputs.values()].map((o) => o.path);
    for (const p of paths) {
      expect((await narOf(store, 'alice', p)).equals(await nixDump(p)), p).toBe(true);
      expect(store.queryPathInfo('alice', p)!.references).toEqual((await nixPathInfo(p)).references.sort());
    }
    const aOut = a.drv.outputs.get('out')!.path;
    expect(store.queryPathInfo('alice', a.drv.outputs.get('dev')!.path)!.references).toEqual([aOut]);
    expect(store.queryPathInfo('alice', aOut)!.references).toEqual([BB]);
  });

  it('fixed-output: correct hash registers with its ca; impure env vars; wrong hash is rejected with SRI hashes', async () => {
    const content = 'fromhost 1\n';
    const good = createHash('sha256').update(content).digest('hex');
    const d = await instantiate(
      work.path,
      'fod',
      `derivation {
  name = "fod.txt";
  system = builtins.currentSystem;
  builder = "\${bb}/bin/sh";
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "${good}";
  impureEnvVars = [ "MYVAR" ];
  args = [ "-c" "echo $MYVAR $NIX_OUTPUT_CHECKED > $out" ];
}`,
    );
    const { builder } = newBuilder({ config: { impureEnv: { MYVAR: 'fromhost' } } });
    const res = await builder.build(request('alice', d.drvPath, basicOf(store, 'alice', d)).req);
    expect(res.status, describeResult(res)).toBe(BuildStatus.Built);
    const out = d.drv.outputs.get('out')!.path;
    const info = store.queryPathInfo('alice', out)!;
    expect(info.ca).toMatch(/^fixed:sha256:[0-9a-z]{52}$/);
    expect(readFileSync((await store.realPath('alice', out))!, 'utf8')).toBe(content);
    // Nix computes the same ca for this content.
    const nixCa = (await nix28('nix-store', ['--add-fixed', 'sha256', writeTemp('fod.txt', content)])).stdout.trim();
    expect((await nixPathInfo(nixCa)).ca).toBe(info.ca);
    expect(nixCa).toBe(out);

    const wrong = createHash('sha256').update('something else\n').digest('hex');
    const bad = fake('bad-fod', 'echo hi > $out', { fixedSha256: wrong });
    const r = await builder.build(request('alice', bad.drvPath, bad.drv).req);
    const sri = (hex: string) => `sha256-${Buffer.from(hex, 'hex').toString('base64')}`;
    expect(r.status).toBe(BuildStatus.OutputRejected);
    expect(r.errorMsg).toBe(
      `hash mismatch in fixed-output derivation '${bad.drvPath}':\n  specified: ${sri(wrong)}\n     got:    ${sri(createHash('sha256').update('hi\n').digest('hex'))}`,
    );
    expect(store.isValidPath('alice', bad.drv.outputs.get('out')!.path)).toBe(false);
  });

  it('recursive fixed-output (sha256 and sha512): same output, ca and path as Nix', async () => {
    const tree = join(work.path, 'rfod-tree');
    mkdirSync(join(tree, 'sub'), { recursive: true });
    writeFileSync(join(tree, 'sub', 'file'), 'recursive\n');
    writeFileSync(join(tree, 'run'), '#!/bin/sh\n', { mode: 0o755 });
    const { builder } = newBuilder();
    for (const algo of ['sha256', 'sha512']) {
      const hash = (await nix28('nix-hash', ['--type', algo, tree])).stdout.trim();
      const d = await instantiate(
        work.path,
        `rfod-${algo}`,
        `derivation {
  name = "rfod-${algo}";
  system = builtins.currentSystem;
  builder = "\${bb}/bin/sh";
  outputHashMode = "recursive";
  outputHashAlgo = "${algo}";
  outputHash = "${hash}";
  args = [ "-c" "export PATH=\${bb}/bin; mkdir -p $out/sub; echo recursive > $out/sub/file; printf '#!/bin/sh\\n' > $out/run; chmod +x $out/run" ];
}`,
      );
      const r = await builder.build(request('alice', d.drvPath, basicOf(store, 'alice', d)).req);
      expect(r.status, describeResult(r)).toBe(BuildStatus.Built);
      const out = d.drv.outputs.get('out')!.path;
      await nixRealise(d.drvPath);
      expect((await narOf(store, 'alice', out)).equals(await nixDump(out))).toBe(true);
      expect(store.queryPathInfo('alice', out)!.ca).toBe((await nixPathInfo(out)).ca);
    }
  });

  it('public when verified and every input is public; private when only claimed', async () => {
    const pub = Store.open({
      stateDir: join(work.path, 'state-public'),
      persist: false,
      trustedPublicKeys: [],
      shareContentAddressed: true,
    });
    try {
      await importFromHost(pub, 'alice', BB);
      expect(pub.queryPathInfo('alice', BB)!.scope).toBe('public');
      const { builder } = newBuilder({}, pub);
      const basic = basicOf(pub, 'alice', hello);
      const claimed = await builder.build(request('alice', hello.drvPath, basic).req);
      expect(claimed.status).toBe(BuildStatus.Built);
      const out = hello.drv.outputs.get('out')!.path;
      expect(pub.queryPathInfo('alice', out)!.scope).toBe('alice');
      const verified = await builder.build(request('bob', hello.drvPath, basic, { verified: true }).req);
      expect(verified.status).toBe(BuildStatus.Built);
      expect(pub.queryPathInfo('bob', out)!.scope).toBe('public');
    } finally {
      pub.close();
    }
  });
});

let tmpN = 0;
function writeTemp(name: string, content: string): string {
  const dir = join(work.path, `tmp-${tmpN++}`);
  mkdirSync(dir);
  const p = join(dir, name);
  writeFileSync(p, content);
  return p;
}

describe('failures', () => {
  it('a failing builder: status 3, exit code and the last 10 log lines', async () => {
    const { builder } = newBuilder();
    const f = fake('fails', 'for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line $i; done; echo to-stderr >&2; exit 3');
    const rec = request('alice', f.drvPath, f.drv);
    const r = await builder.build(rec.req);
    expect(r.status).toBe(BuildStatus.PermanentFailure);
    expect(r.timesBuilt).toBe(0);
    const tail = [
      'line 4',
      'line 5',
      'line 6',
      'line 7',
      'line 8',
      'line 9',
      'line 10',
      'line 11',
      'line 12',
      'to-stderr',
    ];
    expect(r.errorMsg).toBe(
      `builder for '${f.drvPath}' failed with exit code 3;\nlast 10 log lines:\n${tail.map((l) => `> ${l}`).join('\n')}`,
    );
    expect(rec.log()).toContain('line 1\n');
    expect(r.builtOutputs.size).toBe(0);
  });

  it('refuses a fixed output whose path does not match its hash', async () => {
    const { builder } = newBuilder();
    const f = fake('claimed', 'echo hi > $out', { fixedSha256: '1'.repeat(64) });
    const claimed = `/nix/store/${randomHashPart()}-claimed`;
    f.drv.outputs.set('out', { ...f.drv.outputs.get('out')!, path: claimed });
    const r = await builder.build(request('alice', f.drvPath, f.drv).req);
    expect(r.status).toBe(BuildStatus.MiscFailure);
    expect(r.errorMsg).toMatch(/its fixed output path is '.*-claimed', but its hash makes it '.*-claimed'$/);
  });

  it('a failing fixed-output builder is a transient failure', async () => {
    const { builder } = newBuilder();
    const f = fake('fod-fails', 'exit 1', { fixedSha256: '0'.repeat(64) });
    const r = await builder.build(request('alice', f.drvPath, f.drv).req);
    expect(r.status).toBe(BuildStatus.TransientFailure);
    expect(r.errorMsg).toBe(`builder for '${f.drvPath}' failed with exit code 1`);
  });

  it('outputs: missing, unsupported type, cycle, disallowed reference', async () => {
    const { builder } = newBuilder();
    const missing = fake('missing', 'echo nothing');
    let r = await builder.build(request('alice', missing.drvPath, missing.drv).req);
    expect(r.status).toBe(BuildStatus.OutputRejected);
    expect(r.errorMsg).toBe(
      `builder for '${missing.drvPath}' failed to produce output path for output 'out' at '${missing.drv.outputs.get('out')!.path}'`,
    );
    const fifo = fake('fifo', 'mkdir $out; mkfifo $out/pipe');
    r = await builder.build(request('alice', fifo.drvPath, fifo.drv).req);
    expect(r.status).toBe(BuildStatus.OutputRejected);
    expect(r.errorMsg).toBe(`file '${fifo.drv.outputs.get('out')!.path}/pipe' has an unsupported type`);
    const cyc = fake('cyc', 'echo $dev > $out; echo $out > $dev', { outputs: ['out', 'dev'] });
    r = await builder.build(request('alice', cyc.drvPath, cyc.drv).req);
    expect(r.status).toBe(BuildStatus.OutputRejected);
    expect(r.errorMsg).toMatch(
      new RegExp(
        `^cycle detected in build of '${cyc.drvPath}' in the references of output '(out|dev)' from output '(dev|out)'$`,
      ),
    );
    const refs = fake('refs', 'echo $PATH > $out', { env: { allowedReferences: '' } });
    r = await builder.build(request('alice', refs.drvPath, refs.drv).req);
    expect(r.status).toBe(BuildStatus.OutputRejected);
    expect(r.errorMsg).toBe(
      `output '${refs.drv.outputs.get('out')!.path}' is not allowed to refer to the following paths:\n  ${BB}`,
    );
    const ok = fake('refs-ok', 'echo $PATH > $out', { env: { disallowedReferences: 'out' } });
    r = await builder.build(request('alice', ok.drvPath, ok.drv).req);
    expect(r.status, describeResult(r)).toBe(BuildStatus.Built);
  });

  it('maxSilentTime, buildTimeout (capped by the box) and maxLogSize', async () => {
    const { builder, uids } = newBuilder();
    const { builder: capped, uids: cappedUids } = newBuilder({ config: { buildTimeout: 1 } });
    const silent = fake('silent', 'echo hi; sleep 30');
    let t0 = Date.now();
    let r = await builder.build(
      request('alice', silent.drvPath, silent.drv, { options: { maxSilentTime: 1, buildTimeout: 0, maxLogSize: 0 } })
        .req,
    );
    expect(Date.now() - t0).toBeLessThan(1800);
    expect(r.status).toBe(BuildStatus.TimedOut);
    expect(r.errorMsg).toBe(
      `building of '${silent.drvPath}!out' from in-memory derivation timed out after 1 seconds of silence`,
    );
    expect([r.timesBuilt, r.stopTime]).toEqual([0, 0]);

    const chatty = fake('chatty', 'while true; do echo tick; sleep 0.2; done');
    t0 = Date.now();
    r = await capped.build(
      request('alice', chatty.drvPath, chatty.drv, { options: { maxSilentTime: 0, buildTimeout: 100, maxLogSize: 0 } })
        .req,
    );
    expect(Date.now() - t0).toBeLessThan(1800);
    expect(r.status).toBe(BuildStatus.TimedOut);
    expect(r.errorMsg).toBe(`building of '${chatty.drvPath}!out' from in-memory derivation timed out after 1 seconds`);

    const loud = fake(
      'loud',
      'i=0; while [ $i -lt 100 ]; do echo 0123456789012345678901234567890123456789; i=$((i+1)); done; sleep 30',
    );
    const rec = request('alice', loud.drvPath, loud.drv, {
      options: { maxSilentTime: 0, buildTimeout: 0, maxLogSize: 1000 },
    });
    r = await builder.build(rec.req);
    expect(r.status).toBe(BuildStatus.LogLimitExceeded);
    expect(r.errorMsg).toBe(
      `building of '${loud.drvPath}!out' from in-memory derivation killed after writing more than 1000 bytes of log output`,
    );
    expect(Buffer.concat(rec.logs).length).toBeLessThanOrEqual(1000);
    noProcessesLeft([...uids, ...cappedUids]);
  });

  it('refuses at once a system or features the box lacks, mandatory features, and missing inputs', async () => {
    const { builder } = newBuilder({ config: { extraPlatforms: ['i686-linux'] } });
    const arm = fake('arm', 'true', { platform: 'aarch64-linux' });
    let r = await builder.build(request('alice', arm.drvPath, arm.drv).req);
    expect(r.status).toBe(BuildStatus.MiscFailure);
    expect(r.errorMsg).toBe(
      `a 'aarch64-linux' with features {} is required to build '${arm.drvPath}', but I am a 'x86_64-linux' with features {benchmark, big-parallel}; missing: system 'aarch64-linux' (this box builds 'x86_64-linux', 'i686-linux')`,
    );
    const kvm = fake('kvm', 'true', { env: { requiredSystemFeatures: 'kvm big-parallel' } });
    r = await builder.build(request('alice', kvm.drvPath, kvm.drv).req);
    expect(r.status).toBe(BuildStatus.MiscFailure);
    expect(r.errorMsg).toMatch(/with features \{big-parallel, kvm\} is required .* missing: feature 'kvm'$/);
    expect(r.timesBuilt).toBe(0);

    const { builder: strict } = newBuilder({ config: { mandatoryFeatures: ['benchmark'] } });
    const plain = fake('plain', 'true');
    r = await strict.build(request('alice', plain.drvPath, plain.drv).req);
    expect(r.status).toBe(BuildStatus.MiscFailure);
    expect(r.errorMsg).toContain(`'${plain.drvPath}' does not require 'benchmark'`);

    const lost = fake('lost', 'true');
    const ghost = `/nix/store/${randomHashPart()}-ghost`;
    lost.drv.inputSrcs = [BB, ghost].sort();
    r = await builder.build(request('alice', lost.drvPath, lost.drv).req);
    expect(r.status).toBe(BuildStatus.MiscFailure);
    expect(r.errorMsg).toBe(`dependency '${ghost}' of '${lost.drvPath}' does not exist, and substitution is disabled`);

    // i686 builds run with the 32-bit personality.
    const i686 = fake('i686', 'uname -m > $out', { platform: 'i686-linux' });
    r = await builder.build(request('alice', i686.drvPath, i686.drv).req);
    expect(r.status, describeResult(r)).toBe(BuildStatus.Built);
    expect(readFileSync((await store.realPath('alice', i686.drv.outputs.get('out')!.path))!, 'utf8')).toBe('i686\n');
  });
});

describe('sandbox escapes', () => {
  let server: Server;
  let port: number;
  let secret: string;
  beforeAll(async () => {
    server = createServer((s) => s.end('hello from host\n'));
    await new Promise<void>((res) => server.listen(0, '127.0.0.1', res));
    port = (server.address() as { port: number }).port;
    // A path valid in alice's own view, but not in this build's closure.
    const s = fake('secret', 'mkdir $out; echo top secret > $out/data');
    const r = await newBuilder().builder.build(request('alice', s.drvPath, s.drv).req);
    expect(r.status).toBe(BuildStatus.Built);
    secret = s.drv.outputs.get('out')!.path;
  });
  afterAll(() => server.close());

  it('cannot read outside the closure, reach the network, write outside $out and /build, or leave processes', async () => {
    const { builder, uids } = newBuilder();
    const script = [
      'mkdir $out',
      `cat ${secret}/data > $out/secret 2>&1 || echo no-secret >> $out/log`,
      `ls /nix/store > $out/store`,
      `nc -w 2 127.0.0.1 ${port} </dev/null > $out/net 2>&1; echo "nc=$?" >> $out/log`,
      `for p in / /etc /nix/store/${BB.slice(11)} /dev /proc/sys; do (echo x > $p/x) 2>/dev/null && echo "wrote $p" >> $out/log; done`,
      'echo x > /build/ok && echo build-ok >> $out/log',
      'sleep 1000 & (setsid sleep 1000 &) ; echo bg-started >> $out/log',
    ].join('\n');
    const f = fake('escape', script);
    const r = await builder.build(request('alice', f.drvPath, f.drv).req);
    expect(r.status, describeResult(r)).toBe(BuildStatus.Built);
    const out = (await store.realPath('alice', f.drv.outputs.get('out')!.path))!;
    expect(readFileSync(join(out, 'log'), 'utf8')).toBe('no-secret\nnc=1\nbuild-ok\nbg-started\n');
    expect(readFileSync(join(out, 'secret'), 'utf8')).toContain('No such file or directory');
    expect(readFileSync(join(out, 'store'), 'utf8').split('\n').sort()).toEqual(
      ['', BB.slice(11), f.drv.outputs.get('out')!.path.slice(11)].sort(),
    );
    expect(readFileSync(join(out, 'net'), 'utf8')).not.toContain('hello from host');
    noProcessesLeft(uids);
  });

  it('a fixed-output build does reach the network', async () => {
    const { builder } = newBuilder();
    const content = 'hello from host\n';
    const f = fake('fetch', `nc -w 2 127.0.0.1 ${port} </dev/null > $out`, {
      fixedSha256: createHash('sha256').update(content).digest('hex'),
    });
    const r = await builder.build(request('alice', f.drvPath, f.drv).req);
    expect(r.status, describeResult(r)).toBe(BuildStatus.Built);
  });
});

describe('cancellation and scheduling', () => {
  it('aborting a running build kills everything within a second and frees the slot', async () => {
    const { builder, scheduler, uids } = newBuilder({ maxJobs: 1 });
    const f = fake('forever', 'echo started; sleep 1000 & sleep 1000');
    const rec = request('alice', f.drvPath, f.drv);
    const p = builder.build(rec.req);
    while (rec.firstLogAt === undefined) await new Promise((res) => setTimeout(res, 10));
    expect(processesOfUid(uids[0]!).length).toBeGreaterThan(0);
    expect(scheduler.stats().busy).toBe(1);
    const t0 = Date.now();
    rec.ctrl.abort();
    const r = await p;
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(r.status).toBe(BuildStatus.MiscFailure);
    expect(r.errorMsg).toContain('cancelled');
    expect(scheduler.stats().busy).toBe(0);
    noProcessesLeft(uids);
    expect(store.stats().tempRootHolders).toBe(0);
    expect(readdirSync(join(work.path, 'builds')).filter((e) => !e.startsWith('.'))).toEqual([]);
  });

  it('close() cancels running and queued builds', async () => {
    const { builder, scheduler, uids } = newBuilder({ maxJobs: 1 });
    const a = fake('closing-a', 'echo started; sleep 1000');
    const b = fake('closing-b', 'true');
    const ra = request('alice', a.drvPath, a.drv);
    const pa = builder.build(ra.req);
    const pb = builder.build(request('bob', b.drvPath, b.drv).req);
    while (ra.firstLogAt === undefined) await new Promise((res) => setTimeout(res, 10));
    expect(builder.activeBuilds).toBe(2);
    const t0 = Date.now();
    await builder.close();
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(await pa).toMatchObject({
      status: BuildStatus.MiscFailure,
      errorMsg: `build of '${a.drvPath}' cancelled: the box is shutting down`,
    });
    expect((await pb).status).toBe(BuildStatus.MiscFailure);
    expect(builder.activeBuilds).toBe(0);
    expect(scheduler.stats()).toMatchObject({ busy: 0, queue: [] });
    noProcessesLeft(uids);
  });

  it('aborting a queued build removes it from the queue', async () => {
    const { builder, scheduler } = newBuilder({ maxJobs: 1 });
    const first = fake('first', 'echo started; sleep 1000');
    const r1 = request('alice', first.drvPath, first.drv);
    const p1 = builder.build(r1.req);
    while (r1.firstLogAt === undefined) await new Promise((res) => setTimeout(res, 10));
    const second = fake('second', 'true');
    const r2 = request('bob', second.drvPath, second.drv);
    const p2 = builder.build(r2.req);
    while (r2.notices.length === 0) await new Promise((res) => setTimeout(res, 10));
    expect(r2.notices).toEqual(['waiting for a build slot: 0 ahead of you']);
    r2.ctrl.abort();
    const res2 = await p2;
    expect(res2.status).toBe(BuildStatus.MiscFailure);
    expect(scheduler.stats().queue).toEqual([]);
    r1.ctrl.abort();
    await p1;
  });

  it('fairness: with 2 slots, alice queues 6 then bob 1; bob starts when the first slot frees', async () => {
    const { builder, scheduler, uids } = newBuilder({ maxJobs: 2 });
    // a0 ends first (its slot goes to bob, not to a2), a1 runs long; the others are short.
    const mk = (user: string, i: number, secs: number) => {
      const f = fake(`fair-${user}-${i}`, `echo started; sleep ${secs}; echo > $out`);
      return request(user, f.drvPath, f.drv);
    };
    const alice = Array.from({ length: 6 }, (_, i) => mk('alice', i, i === 0 ? 0.4 : i === 1 ? 1.5 : 0.3));
    const done: Array<Promise<unknown>> = [];
    for (const a of alice) {
      done.push(builder.build(a.req));
      await new Promise((res) => setTimeout(res, 5));
    }
    while (scheduler.stats().busy < 2) await new Promise((res) => setTimeout(res, 10));
    const bob = mk('bob', 0, 0.3);
    done.push(builder.build(bob.req));
    const results = (await Promise.all(done)) as Array<{ status: number }>;
    expect(results.map((r) => r.status)).toEqual(Array(7).fill(BuildStatus.Built));
    const starts = [...alice.map((a, i) => ({ who: `a${i}`, t: a.firstLogAt! })), { who: 'bob', t: bob.firstLogAt! }]
      .sort((x, y) => x.t - y.t)
      .map((x) => x.who);
    expect(starts.slice(0, 3).sort(), starts.join(' ')).toEqual(['a0', 'a1', 'bob']);
    expect(starts.indexOf('bob'), starts.join(' ')).toBe(2);
    expect(bob.notices).toEqual(['waiting for a build slot: 0 ahead of you']);
    // a5 queued with 3 ahead (a2, a3, a4), then bob went before it: 4, then it moved up as slots freed.
    expect(alice[5]!.notices.slice(0, 2)).toEqual([
      'waiting for a build slot: 3 ahead of you',
      'waiting for a build slot: 4 ahead of you',
    ]);
    expect(alice[5]!.notices.at(-1)).toBe('waiting for a build slot: 0 ahead of you');
    expect(alice[0]!.notices).toEqual([]);
    noProcessesLeft(uids);
    expect(existsSync(join(work.path, 'builds', '.exec-helper'))).toBe(true);
    expect(lstatSync(join(work.path, 'builds')).mode & 0o777).toBe(0o711);
  });
});
