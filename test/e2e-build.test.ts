/**
 * Issue 4 end to end: `nix-build --max-jobs 0 --builders 'ssh://alice@box …'` with the real Nix 2.8 and 2.26 clients
 * builds on the box, in its sandbox, with the same results as a local Nix build.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBox, type TestBox } from './helpers/box.js';
import { compiledCli } from './helpers/cli.js';
import { run } from './helpers/exec.js';
import { CLIENTS, nixEnv } from './helpers/nix.js';

let tb: TestBox;
let hello: string;
const SYSTEM = process.arch === 'x64' ? 'x86_64-linux' : 'aarch64-linux';

beforeAll(async () => {
  tb = await startTestBox({ users: ['alice', 'bob'], config: { maxJobs: 2 } });
  hello = tb.helloBox();
  writeFileSync(
    join(tb.dir, 'hello', 'more.nix'),
    `{ salt, sleep ? "0", target ? "", port ? "0" }:
let
  bb = builtins.path { path = ./bb; name = "busybox"; };
  mk = attrs: derivation ({ system = builtins.currentSystem; builder = "\${bb}/bin/sh"; PATH = "\${bb}/bin"; } // attrs);
in rec {
  multi = mk { name = "multi-\${salt}"; outputs = [ "out" "dev" ];
    args = [ "-c" "mkdir -p $out/lib $dev; echo lib > $out/lib/x; ln -s $out/lib/x $dev/link; echo $out > $dev/ref" ]; };
  a = mk { name = "a-\${salt}"; args = [ "-c" "echo A > $out" ]; };
  b = mk { name = "b-\${salt}"; inherit a; args = [ "-c" "read x < $a; echo \\"B after $x from $a\\" > $out" ]; };
  failing = mk { name = "failing-\${salt}"; args = [ "-c" "echo line-one; echo line-two >&2; exit 3" ]; };
  fod = mk { name = "fod-\${salt}"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "0000000000000000000000000000000000000000000000000000"; args = [ "-c" "echo hello > $out" ]; };
  silent = mk { name = "silent-\${salt}"; args = [ "-c" "echo start; sleep 30; echo done > $out" ]; };
  kvm = mk { name = "kvm-\${salt}"; requiredSystemFeatures = [ "kvm" ]; args = [ "-c" "echo > $out" ]; };
  slow = mk { name = "slow-\${salt}"; args = [ "-c" "echo started; sleep \${sleep}; echo ok > $out" ]; };
  escape = mk { name = "escape-\${salt}"; inherit target port; args = [ "-c" ''
    mkdir $out
    ls /nix/store > $out/store
    if cat $target/* >/dev/null 2>&1; then echo yes; else echo no; fi > $out/read-outside
    if wget -q -T 2 -O /dev/null http://127.0.0.1:$port/ 2>/dev/null; then echo yes; else echo no; fi > $out/network
    if touch \${bb}/planted 2>/dev/null; then echo yes; else echo no; fi > $out/write-input
    if touch /etc/planted 2>/dev/null; then echo yes; else echo no; fi > $out/write-etc
    touch /tmp/ok && touch /build/ok && echo yes > $out/write-tmp-build
    id -u > $out/uid
    (sleep 1000 &)
    sleep 1000 &
  '' ]; };
}
`,
  );
});
afterAll(async () => {
  await tb?.stop();
});

const nonce = () => randomBytes(6).toString('hex');
const builders = (user = 'alice', features = '') => `ssh://${user}@box ${SYSTEM} - 2 1 ${features}`.trim();

function build(
  client: (typeof CLIENTS)[number],
  args: string[],
  opts: { user?: string; features?: string; allowFail?: boolean } = {},
) {
  return tb.nix(
    client.run,
    'nix-build',
    [
      '--no-out-link',
      '--max-jobs',
      '0',
      '--builders',
      builders(opts.user, opts.features),
      '--option',
      'builders-use-substitutes',
      'false',
      ...args,
    ],
    { allowFail: opts.allowFail },
  );
}

describe.each(CLIENTS)('remote builds over ssh:// with $name', (client) => {
  it('builds hello-box on the box, identical to a local build', async () => {
    const greeting = `hello-${nonce()}`;
    const r = await build(client, [hello, '--argstr', 'greeting', greeting]);
    const out = r.stdout.trim();
    expect(out).toMatch(/^\/nix\/store\/[a-z0-9]{32}-hello-box$/);
    const remote = await tb.nix(client.run, 'nix-store', ['--dump', out], {});
    expect(remote.stdout).toContain(greeting);
    // The box registered it in alice's view with the client's drv as deriver.
    const info = tb.box.store.queryPathInfo('alice', out);
    expect(info?.narHash.toBase16()).toBeDefined();
    // A local build of the same derivation gives the same NAR.
    const drv = (await tb.nix(client.run, 'nix-store', ['-q', '--deriver', out])).stdout.trim();
    await tb.nix(client.run, 'nix-store', ['--delete', out]);
    await tb.nix(client.run, 'nix-store', ['--realise', drv, '--max-jobs', '1', '--builders', '']);
    const local = await tb.nix(client.run, 'nix-store', ['--dump', out]);
    expect(local.stdout).toBe(remote.stdout);
  });

  it('builds multi-output derivations and chains where B uses A', async () => {
    const salt = nonce();
    const more = join(tb.dir, 'hello', 'more.nix');
    const multi = await build(client, [more, '-A', 'multi.out', '-A', 'multi.dev', '--argstr', 'salt', salt]);
    const lines = multi.stdout.trim().split('\n');
    const dev = lines.find((l) => l.endsWith('-dev'));
    const out = lines.find((l) => !l.endsWith('-dev'));
    expect(dev).toMatch(/-multi-[0-9a-f]+-dev$/);
    const devInfo = tb.box.store.queryPathInfo('alice', dev!);
    expect(devInfo?.references).toEqual([out]);
    const chain = await build(client, [more, '-A', 'b', '--argstr', 'salt', salt]);
    const bOut = chain.stdout.trim();
    const bInfo = tb.box.store.queryPathInfo('alice', bOut);
    expect(bInfo?.references).toHaveLength(1);
    expect(bInfo?.references[0]).toMatch(new RegExp(`-a-${salt}$`));
  });

  it('reports a failing builder with its log tail', async () => {
    const more = join(tb.dir, 'hello', 'more.nix');
    const r = await build(client, [more, '-A', 'failing', '--argstr', 'salt', nonce()], { allowFail: true });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('line-one');
    expect(r.stderr).toContain('line-two');
    expect(r.stderr).toMatch(/failed with exit code 3/);
    // The box keeps its own copy of the log, per user.
    const drv = /building '(\/nix\/store\/[^']+\.drv)'/.exec(r.stderr)![1]!;
    const cli = await compiledCli();
    const stateDir = tb.box.config.stateDir;
    const log = await run('node', [cli, 'log', drv, '--state-dir', stateDir]);
    expect(log.stdout).toBe('line-one\nline-two\n');
    const bob = await run('node', [cli, 'log', drv, '--user', 'bob', '--state-dir', stateDir], { allowFail: true });
    expect(bob.code).toBe(1);
    expect(bob.stderr).toContain(`no build log of ${drv.slice(11)} on this box for bob`);
  });

  it('rejects a fixed-output derivation with a wrong hash, showing both hashes', async () => {
    const more = join(tb.dir, 'hello', 'more.nix');
    const r = await build(client, [more, '-A', 'fod', '--argstr', 'salt', nonce()], { allowFail: true });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/hash mismatch in fixed-output derivation/);
    expect(r.stderr).toContain('sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=');
  });

  it('enforces max-silent-time and timeout from the client', async () => {
    const more = join(tb.dir, 'hello', 'more.nix');
    const silent = await build(
      client,
      [more, '-A', 'silent', '--argstr', 'salt', nonce(), '--option', 'max-silent-time', '2'],
      {
        allowFail: true,
      },
    );
    expect(silent.code).not.toBe(0);
    expect(silent.stderr).toMatch(/timed out after 2 seconds of silence/);
    const timeout = await build(
      client,
      [more, '-A', 'slow', '--argstr', 'salt', nonce(), '--argstr', 'sleep', '30', '--option', 'timeout', '2'],
      {
        allowFail: true,
      },
    );
    expect(timeout.code).not.toBe(0);
    expect(timeout.stderr).toMatch(/timed out after 2 seconds/);
  });

  it('refuses a derivation needing a feature the box lacks, naming it', async () => {
    const more = join(tb.dir, 'hello', 'more.nix');
    const r = await build(client, [more, '-A', 'kvm', '--argstr', 'salt', nonce()], {
      allowFail: true,
      features: 'kvm',
    });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/kvm/);
    expect(r.stderr).toMatch(/is required to build/);
  });
});

describe('the sandbox, seen through a real client', () => {
  it('hides the rest of the store, has no network, keeps writes to $out, /build and /tmp, and leaves no process', async () => {
    const more = join(tb.dir, 'hello', 'more.nix');
    const salt = nonce();
    // A path valid for alice on the box but outside this build's closure.
    const other = (await build(CLIENTS[0]!, [more, '-A', 'a', '--argstr', 'salt', salt])).stdout.trim();
    expect(tb.box.store.isValidPath('alice', other)).toBe(true);
    const r = await build(CLIENTS[0]!, [
      more,
      '-A',
      'escape',
      '--argstr',
      'salt',
      salt,
      '--argstr',
      'target',
      other,
      '--argstr',
      'port',
      String(tb.box.status!.port),
    ]);
    const out = r.stdout.trim();
    const file = (n: string) => readFileSync(join(out, n), 'utf8').trim();
    expect(file('store').split('\n').sort()).toEqual(
      [
        basename(out),
        ...tb.box.store
          .queryClosure('alice', [out])
          .filter((p) => p !== out)
          .map((p) => basename(p)),
      ].sort(),
    );
    expect(file('store')).not.toContain(basename(other));
    expect(file('read-outside')).toBe('no');
    expect(file('network')).toBe('no');
    expect(file('write-input')).toBe('no');
    expect(file('write-etc')).toBe('no');
    expect(file('write-tmp-build')).toBe('yes');
    expect(file('uid')).toBe('1000');
    const sleepers = await run('pgrep', ['-f', 'sleep 1000'], { allowFail: true });
    expect(sleepers.stdout.trim()).toBe('');
  });
});

describe('sharing the box', () => {
  it('gives the next slot to bob rather than to alice’s queue, and tells waiting builds their position', async () => {
    const more = join(tb.dir, 'hello', 'more.nix');
    const salt = nonce();
    const started = Date.now();
    const alice = Array.from({ length: 6 }, (_, i) =>
      build(CLIENTS[0]!, [more, '-A', 'slow', '--argstr', 'salt', `${salt}-${i}`, '--argstr', 'sleep', '3']).then(
        (r) => ({
          r,
          at: Date.now() - started,
        }),
      ),
    );
    await new Promise((r) => setTimeout(r, 1500));
    const bob = await build(
      CLIENTS[0]!,
      [more, '-A', 'slow', '--argstr', 'salt', `${salt}-bob`, '--argstr', 'sleep', '3'],
      { user: 'bob' },
    );
    const bobAt = Date.now() - started;
    const results = await Promise.all(alice);
    const aliceTimes = results.map((x) => x.at).sort((a, b) => a - b);
    // bob got the first slot that freed (after alice's first two), not the one after all six of alice's.
    expect(bobAt).toBeLessThan(aliceTimes[5]!);
    expect(bobAt).toBeLessThan(aliceTimes[3]! + 500);
    expect(bob.stdout.trim()).toMatch(/-slow-/);
    const logs = results.map((x) => x.r.stderr).join('\n');
    expect(logs).toMatch(/waiting for a build slot: \d+ ahead of you/);
  }, 120_000);

  it('cancels a build within a second when its client disappears', async () => {
    const more = join(tb.dir, 'hello', 'more.nix');
    // The client and everything it started (build hook, ssh) in one process group, killed together.
    const child = spawn(
      'nix-build',
      [
        '--no-out-link',
        '--max-jobs',
        '0',
        '--builders',
        builders(),
        more,
        '-A',
        'slow',
        '--argstr',
        'salt',
        nonce(),
        '--argstr',
        'sleep',
        '60',
      ],
      { env: nixEnv(tb.env), detached: true, stdio: 'ignore' },
    );
    const exited = new Promise((r) => child.on('close', r));
    // Wait until the build runs on the box.
    const deadline = Date.now() + 20_000;
    while (tb.box.scheduler.stats().busy === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(tb.box.scheduler.stats().busy).toBe(1);
    // The client machine "dies": nix-build, its build hook and the ssh connection (which Nix may start in a session of
    // its own) are all killed at once.
    process.kill(-child.pid!, 'SIGKILL');
    await run('pkill', ['-KILL', '-f', tb.sshConfig], { allowFail: true });
    await exited;
    const killedAt = Date.now();
    while (tb.box.scheduler.stats().busy > 0 && Date.now() - killedAt < 5000)
      await new Promise((r) => setTimeout(r, 50));
    expect(Date.now() - killedAt).toBeLessThan(1500);
    expect(tb.box.scheduler.stats().busy).toBe(0);
  }, 60_000);
});
