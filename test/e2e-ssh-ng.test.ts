/**
 * Issue 5 end to end: the real Nix clients (2.8 on the host, 2.26 in the trixie root) talk the worker protocol to a
 * running box over `ssh-ng://` through the real OpenSSH client: store info, copies both ways, path info, remote builds
 * with `--builders 'ssh-ng://…'`, and remote-store builds (`nix build --store ssh-ng://… --eval-store auto`, both clients) whose
 * verified outputs become public, signed by the box, and are not rebuilt for another user; while the output of a
 * legacy (unverifiable) BuildDerivation stays private. Plus bad input through the real front door.
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { drvNameFromPath, parseDerivation } from '../src/derivation.js';
import { SecretKey } from '../src/signing.js';
import { STDERR_ERROR, STDERR_LAST, WORKER_MAGIC_1, WORKER_MAGIC_2 } from '../src/worker-protocol.js';
import { startTestBox, type TestBox } from './helpers/box.js';
import { CLIENTS } from './helpers/nix.js';
import { openRaw, serveHandshake } from './helpers/serve-client.js';
import { uniqueTag } from './helpers/store-fixtures.js';

let tb: TestBox;
let tag: string;
let helloNix: string;

beforeAll(async () => {
  // share-content-addressed: the busybox source the clients upload is content-addressed, so it becomes public, and a
  // verified build from public inputs is public too (trust model, cases 2 and 3).
  tb = await startTestBox({
    users: ['alice', 'bob', 'carol'],
    config: { shareContentAddressed: true, statusPort: null },
  });
  tag = uniqueTag();
  helloNix = tb.helloBox();
});
afterAll(async () => {
  await tb?.stop();
});

type Client = (typeof CLIENTS)[number];

/** Narhash by path from `nix path-info --json` (an array in 2.8, an object keyed by path in 2.19+). */
function narHashes(json: string): Record<string, string> {
  const v = JSON.parse(json) as Array<{ path: string; narHash: string }> | Record<string, { narHash: string }>;
  return Array.isArray(v)
    ? Object.fromEntries(v.map((x) => [x.path, x.narHash]))
    : Object.fromEntries(Object.entries(v).map(([k, x]) => [k, x.narHash]));
}

/**
 * `nix path-info --json` of one path on the box as `user`, or undefined if the path is not valid for them (Nix 2.8
 * prints `"valid": false` and exits 0, 2.26 prints `null` or fails).
 */
async function pathInfo(
  client: Client,
  user: string,
  path: string,
): Promise<{ narHash: string; signatures?: string[] } | undefined> {
  const r = await tb.nix(client.run, 'nix', ['path-info', '--store', `ssh-ng://${user}@box`, '--json', path], {
    allowFail: true,
  });
  if (r.code !== 0) return undefined;
  const v = JSON.parse(r.stdout) as
    | Array<{ path: string; valid?: boolean; narHash: string; signatures?: string[] }>
    | Record<string, { narHash: string; signatures?: string[] } | null>;
  const e = Array.isArray(v) ? v.find((x) => x.path === path && x.valid !== false) : v[path];
  return e ?? undefined;
}

/** A small closure in a client store: a directory and two text files referencing it. */
async function makeClosure(client: Client, store: string, salt: string): Promise<{ top: string; all: string[] }> {
  const dir = join(tb.dir, `src-${salt}`);
  mkdirSync(join(dir, 'tree'), { recursive: true });
  writeFileSync(join(dir, 'tree', 'data'), `${'y'.repeat(200_000)}${salt}`);
  writeFileSync(join(dir, 'tree', 'run'), `#!/bin/sh\necho ${salt}\n`, { mode: 0o755 });
  const expr = `let t = builtins.path { path = ${dir}/tree; name = "tree-${salt}"; };
    a = builtins.toFile "a-${salt}" "uses \${t}";
  in builtins.toFile "top-${salt}" "top \${a} \${t}"`;
  const r = await tb.nix(client.run, 'nix-instantiate', ['--store', store, '--eval', '--read-write-mode', '-E', expr]);
  const top = JSON.parse(r.stdout.trim()) as string;
  const closure = await tb.nix(client.run, 'nix-store', ['--store', store, '-qR', top]);
  return { top, all: closure.stdout.trim().split('\n').sort() };
}

describe.each(CLIENTS)('ssh-ng:// with $name', (client) => {
  const salt = `${client.name.replace(/\W/g, '')}${Math.random().toString(36).slice(2, 8)}`;

  it('answers nix store ping with the box version', async () => {
    const r = await tb.nix(client.run, 'nix', ['store', 'ping', '--store', 'ssh-ng://alice@box']);
    expect(`${r.stdout}${r.stderr}`).toMatch(/Version: 2\.26\.0 \(buildbox /);
    if (client.version === '2.26') expect(`${r.stdout}${r.stderr}`).toMatch(/Trusted: 0/);
  });

  it('copies a closure to the box and back, and nix path-info -r --json agrees', async () => {
    const src = `local?root=${tb.clientStore(`ng-src-${salt}`)}`;
    const dst = `local?root=${tb.clientStore(`ng-dst-${salt}`)}`;
    const { top, all } = await makeClosure(client, src, salt);
    expect(all).toHaveLength(3);
    // Unsigned, and the client checks nothing special: the box accepts it into alice's scope.
    await tb.nix(client.run, 'nix', ['copy', '--from', src, '--to', 'ssh-ng://alice@box', top]);
    const remote = await tb.nix(client.run, 'nix', ['path-info', '--store', 'ssh-ng://alice@box', '-r', '--json', top]);
    const local = await tb.nix(client.run, 'nix', ['path-info', '--store', src, '-r', '--json', top]);
    expect(Object.keys(narHashes(remote.stdout)).sort()).toEqual(all);
    expect(narHashes(remote.stdout)).toEqual(narHashes(local.stdout));
    await tb.nix(client.run, 'nix', ['copy', '--no-check-sigs', '--from', 'ssh-ng://alice@box', '--to', dst, top]);
    const back = await tb.nix(client.run, 'nix', ['path-info', '--store', dst, '-r', '--json', top]);
    expect(narHashes(back.stdout)).toEqual(narHashes(local.stdout));
    // Every path of this closure is content-addressed and verified, so (share-content-addressed) bob sees it too,
    // without anyone's signature; carol, who uploaded nothing, sees the same public objects.
    const bob = await tb.nix(client.run, 'nix', ['path-info', '--store', 'ssh-ng://carol@box', '-r', '--json', top]);
    expect(narHashes(bob.stdout)).toEqual(narHashes(local.stdout));
  });

  it("builds with --builders 'ssh-ng://…' and copies the result back", async () => {
    const store = tb.clientStore(`ng-build-${salt}`);
    const greeting = `hi${salt}${tag}`;
    const r = await tb.nix(client.run, 'nix-build', [
      '--store',
      `local?root=${store}`,
      helloNix,
      '--argstr',
      'greeting',
      greeting,
      '--no-out-link',
      '--max-jobs',
      '0',
      '--builders',
      `ssh-ng://alice@box ${tb.box.config.system}`,
    ]);
    const out = r.stdout.trim().split('\n').pop()!;
    expect(readFileSync(join(store, out, 'greeting'), 'utf8')).toBe(`${greeting}\n`);
    const alice = await pathInfo(client, 'alice', out);
    const bob = await pathInfo(client, 'bob', out);
    expect(alice).toBeDefined();
    if (client.version === '2.8') {
      // Nix 2.8 sends a legacy BuildDerivation: unverifiable, so the output is alice's alone, and unsigned.
      expect(alice!.signatures ?? []).toEqual([]);
      expect(bob).toBeUndefined();
    } else {
      // Nix 2.26 sees "not trusted", uploads the .drv closure and asks BuildPathsWithResults: verified, public inputs,
      // so the output is public and signed by the box.
      expect(bob).toBeDefined();
      expect(bob!.signatures).toEqual([expect.stringMatching(new RegExp(`^${tb.box.signingKey.name}:`))]);
    }
  });
});

describe.each(CLIENTS)('remote-store builds with $name (nix build --store ssh-ng://… --eval-store auto)', (client) => {
  const salt = client.name.replace(/\W/g, '');
  const build = async (user: string, greeting: string) => {
    const r = await tb.nix(
      client.run,
      'nix',
      [
        'build',
        '--store',
        `ssh-ng://${user}@box`,
        '--eval-store',
        'auto',
        '-f',
        helloNix,
        '--argstr',
        'greeting',
        greeting,
        '--no-link',
        '--json',
        '-L',
      ],
      { allowFail: true },
    );
    const out =
      r.code === 0 ? (JSON.parse(r.stdout) as Array<{ outputs: Record<string, string> }>)[0]?.outputs.out : undefined;
    return { ...r, out };
  };

  it('builds on the box for alice; bob gets the same output without a rebuild, signed by the box', async () => {
    const greeting = `shared${salt}${tag}`;
    const a = await build('alice', greeting);
    if (a.code !== 0) throw new Error(`alice's build failed:\n${a.stderr}`);
    const out = a.out!;
    expect(out).toMatch(/^\/nix\/store\/[0-9a-z]{32}-hello-box$/);
    expect(a.stderr).toMatch(/building '\/nix\/store\/[0-9a-z]{32}-hello-box\.drv'/);

    const b = await build('bob', greeting);
    if (b.code !== 0) throw new Error(`bob's build failed:\n${b.stderr}`);
    expect(b.out).toBe(out);
    expect(b.stderr).toContain(
      `buildbox: '${out}' is already valid on the box (public, signed by ${tb.box.signingKey.name}); not rebuilt`,
    );
    expect(b.stderr).not.toMatch(/building '/);

    // bob gets the contents, and the signature verifies with the box's public key (and not with another key).
    const pub = tb.box.signingKey.publicKey.toString();
    const verify = (key: string) =>
      tb.nix(
        client.run,
        'nix',
        ['store', 'verify', '--store', 'ssh-ng://bob@box', '--trusted-public-keys', key, '--sigs-needed', '1', out],
        { allowFail: true },
      );
    const good = await verify(pub);
    if (good.code !== 0) throw new Error(`nix store verify failed:\n${good.stderr}`);
    expect((await verify(SecretKey.generate('someone-else-1').publicKey.toString())).code).not.toBe(0);
    const dst = tb.clientStore(`rs-bob-${salt}-${tag}`);
    await tb.nix(client.run, 'nix', [
      'copy',
      '--from',
      'ssh-ng://bob@box',
      '--to',
      `local?root=${dst}`,
      '--trusted-public-keys',
      pub,
      out,
    ]);
    expect(readFileSync(join(dst, out, 'greeting'), 'utf8')).toBe(`${greeting}\n`);
  });

  it('nix-store --realise: QueryMissing says what will be built, then BuildPaths builds it', async () => {
    const root = tb.clientStore(`realise-${salt}-${tag}`);
    const drvPath = (
      await tb.nix(client.run, 'nix-instantiate', [
        '--store',
        `local?root=${root}`,
        helloNix,
        '--argstr',
        'greeting',
        `realise${salt}${tag}`,
      ])
    ).stdout.trim();
    await tb.nix(client.run, 'nix', [
      'copy',
      '--derivation',
      '--from',
      `local?root=${root}`,
      '--to',
      'ssh-ng://carol@box',
      drvPath,
    ]);
    const r = await tb.nix(client.run, 'nix-store', ['--store', 'ssh-ng://carol@box', '--realise', drvPath]);
    expect(r.stderr).toMatch(new RegExp(`derivations? will be built:\\s+${drvPath.replace(/\./g, '\\.')}`));
    const out = r.stdout.trim();
    expect(out).toMatch(/-hello-box$/);
    expect(await pathInfo(client, 'carol', out)).toBeDefined();
  });

  it('reports a failing build as a clear error', async () => {
    const r = await build('carol', `x${salt}; exit 3; echo`);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/hello-box\.drv/);
    expect(r.stderr).toMatch(/exit code 3/);
  });
});

describe('bad input through the real front door', () => {
  it('answers an invalid store path with STDERR_ERROR and ends that session; others carry on', async () => {
    const s = openRaw(tb.sshConfig, 'alice', 'nix-daemon --stdio');
    s.w.u64(WORKER_MAGIC_1).u64(0x122);
    await s.w.flush();
    expect(await s.r.readU64()).toBe(WORKER_MAGIC_2);
    expect(await s.r.readU64()).toBe(0x126);
    s.w.u64(0).u64(0);
    await s.w.flush();
    await s.r.readString();
    expect(await s.r.readU64()).toBe(STDERR_LAST);
    s.w.u64(26).string('/nix/store/../../etc/passwd');
    await s.w.flush();
    expect(await s.r.readU64()).toBe(STDERR_ERROR);
    await s.r.readString();
    await s.r.readU64();
    await s.r.readString();
    expect(await s.r.readString()).toMatch(
      /^QueryPathInfo: path '\/nix\/store\/\.\.\/\.\.\/etc\/passwd' is not a store path/,
    );
    expect(await s.exited).toBe(1);
    const ping = await tb.nix(CLIENTS[0]!.run, 'nix', ['store', 'ping', '--store', 'ssh-ng://bob@box']);
    expect(ping.code).toBe(0);
  });
});

describe('serve BuildPaths (ssh://, command 6) realises through the same verified path', () => {
  it('builds an uploaded .drv closure, and refuses a .drv the box does not have', async () => {
    const client = CLIENTS[0]!;
    const root = tb.clientStore(`serve-bp-${tag}`);
    const greeting = `servebp${tag}`;
    const drvPath = (
      await tb.nix(client.run, 'nix-instantiate', [
        '--store',
        `local?root=${root}`,
        helloNix,
        '--argstr',
        'greeting',
        greeting,
      ])
    ).stdout.trim();
    await tb.nix(client.run, 'nix', [
      'copy',
      '--derivation',
      '--from',
      `local?root=${root}`,
      '--to',
      'ssh-ng://alice@box',
      drvPath,
    ]);
    const out = parseDerivation(readFileSync(join(root, drvPath), 'latin1'), drvNameFromPath(drvPath)).outputs.get(
      'out',
    )!.path;

    const buildPaths = async (paths: string[]) => {
      const s = openRaw(tb.sshConfig, 'alice', 'nix-store --serve --write');
      expect(await serveHandshake(s)).toBe(0x207);
      s.w.u64(6).strings(paths).u64(0).u64(0).u64(0).u64(0).u64(0).u64(0);
      await s.w.flush();
      const status = await s.r.readU64();
      const msg = status === 0 ? '' : await s.r.readString();
      s.child.stdin.end();
      expect(await s.exited).toBe(0);
      return { status, msg, stderr: s.stderr() };
    };
    const ok = await buildPaths([drvPath]); // a bare .drv: all its outputs (StorePathWithOutputs syntax)
    expect(ok.status).toBe(0);
    expect(await pathInfo(client, 'alice', out)).toBeDefined();

    const missing = `/nix/store/${'5'.repeat(32)}-nothing.drv`;
    const bad = await buildPaths([`${missing}!out`]);
    expect(bad.status).toBe(9);
    expect(bad.msg).toBe(
      `derivation '${missing}' is not valid on the box for you; copy the .drv closure first (nix copy --derivation)`,
    );
  });
});
