import { existsSync, mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  bwrapArgs,
  ETC_GROUP,
  ETC_HOSTS,
  etcPasswd,
  killUidProcesses,
  prepareSandboxDirs,
  processesOfUid,
  type SandboxInput,
  spawnSandbox,
  writeExecHelper,
} from '../src/sandbox.js';
import { makeBusyboxTree, openTempDir } from './helpers/build-sandbox.js';

const BB = '/nix/store/ap5lw0pk87zllpr8psdiqgxx50yqpp1h-busybox';
const SECRET = '/nix/store/00000000000000000000000000000000-secret';
const LINK = '/nix/store/11111111111111111111111111111111-link';
const FILEOBJ = '/nix/store/22222222222222222222222222222222-file.txt';
const UID = 30950;

let tmp: { path: string; cleanup: () => void };
let objects: string;
let inputs: SandboxInput[];
let helper: string;
let n = 0;

beforeAll(() => {
  tmp = openTempDir('buildbox-sandbox-');
  objects = join(tmp.path, 'objects');
  mkdirSync(objects, { mode: 0o755 });
  makeBusyboxTree(join(objects, 'bb'));
  // An object that exists on the host but is not in the closure.
  mkdirSync(join(objects, 'secret'), { mode: 0o755 });
  writeFileSync(join(objects, 'secret', 'data'), 'top secret\n', { mode: 0o444 });
  writeFileSync(join(objects, 'file.txt'), 'a file object\n', { mode: 0o444 });
  symlinkSync(`${BB}/bin/busybox`, join(objects, 'link'));
  helper = join(tmp.path, 'exec-helper');
  expect(writeExecHelper(helper)).toBe(true);
  inputs = [
    { path: BB, hostPath: join(objects, 'bb') },
    { path: LINK, hostPath: join(objects, 'link') },
    { path: FILEOBJ, hostPath: join(objects, 'file.txt') },
  ];
});
afterAll(async () => {
  await killUidProcesses(UID);
  tmp.cleanup();
});

interface Ran {
  out: string;
  code: number | null;
  started: boolean;
  swept: boolean;
  dirs: Awaited<ReturnType<typeof prepareSandboxDirs>>;
}

async function runIn(
  script: string,
  opts: {
    fixedOutput?: boolean;
    env?: Record<string, string>;
    uid?: number;
    inputs?: SandboxInput[];
    builder?: string;
    helper?: boolean;
  } = {},
): Promise<Ran> {
  const uid = opts.uid ?? UID;
  const dirs = await prepareSandboxDirs(join(tmp.path, `sb${n++}`), uid, uid, { fixedOutput: !!opts.fixedOutput });
  const p = spawnSandbox(
    {
      dirs,
      inputs: opts.inputs ?? inputs,
      fixedOutput: !!opts.fixedOutput,
      builder: opts.builder ?? `${BB}/bin/sh`,
      args: ['-c', script],
      env: { PATH: `${BB}/bin`, out: '/nix/store/33333333333333333333333333333333-out', ...opts.env },
      execHelper: opts.helper === false ? undefined : helper,
    },
    { uid, gid: uid },
  );
  const chunks: Buffer[] = [];
  p.output.on('data', (c: Buffer) => chunks.push(c));
  const r = await p.exited;
  await new Promise((res) => (p.output.readableEnded ? res(null) : p.output.once('end', res)));
  return { out: Buffer.concat(chunks).toString('latin1'), code: r.code, started: r.started, swept: r.swept, dirs };
}

describe('sandbox', () => {
  it('builds the argv with every namespace, and keeps the network only for fixed-output', () => {
    const dirs = { top: '/t', buildDir: '/t/build', storeHostDir: '/t/store', etcDir: '/t/etc' };
    const base = { dirs, inputs: [], builder: `${BB}/bin/sh`, args: ['-c', 'x'], env: { a: 'b' } };
    const a = bwrapArgs({ ...base, fixedOutput: false });
    for (const f of ['--unshare-user', '--unshare-pid', '--unshare-ipc', '--unshare-uts', '--unshare-net']) {
      expect(a).toContain(f);
    }
    for (const f of ['--die-with-parent', '--new-session', '--clearenv', '--as-pid-1']) expect(a).toContain(f);
    expect(a.slice(-4)).toEqual(['--', `${BB}/bin/sh`, '-c', 'x']);
    const fod = bwrapArgs({ ...base, fixedOutput: true });
    expect(fod).not.toContain('--unshare-net');
    expect(fod.join(' ')).toContain('--ro-bind-try /etc/resolv.conf /etc/resolv.conf');
    expect(() => bwrapArgs({ ...base, fixedOutput: false, env: { a: 'x\0y' } })).toThrow(/NUL/);
  });

  it('runs as uid 1000/gid 100 inside, the slot uid outside, with Nix /etc files and hostname', async () => {
    const r = await runIn(
      'echo pid=$$; id; hostname; cat /etc/passwd /etc/group /etc/hosts; ls /etc; stat -c "%a" / /etc /tmp /build /nix /nix/store /dev; pwd',
    );
    expect(r.code).toBe(0);
    const lines = r.out.split('\n');
    expect(lines[0]).toBe('pid=1'); // the builder is PID 1 of its namespace, as under Nix
    expect(lines[1]).toBe('uid=1000(nixbld) gid=100(nixbld)');
    expect(lines[2]).toBe('localhost');
    expect(r.out).toContain(etcPasswd() + ETC_GROUP + ETC_HOSTS);
    expect(r.out).toContain('group\nhosts\npasswd\n');
    // As observed under Nix 2.8's sandbox: / 750, /etc 755, /tmp 1777, /build 700, /nix 755, /nix/store 1775, /dev 755.
    expect(r.out).toContain('750\n755\n1777\n700\n755\n1775\n755\n/build\n');
  });

  it('shows only the input closure in /nix/store, read-only; symlink and file objects intact', async () => {
    const r = await runIn(
      `ls -a /nix/store; readlink ${LINK}; cat ${FILEOBJ}; cat ${SECRET}/data; echo x > ${BB}/new; echo x > ${FILEOBJ}; ls /work /root; echo end`,
    );
    const ls = r.out.split('\n').slice(0, 5);
    expect(ls).toEqual(['.', '..', FILEOBJ.slice(11), LINK.slice(11), BB.slice(11)].sort());
    expect(r.out).toContain(`${BB}/bin/busybox\na file object\n`);
    expect(r.out).toMatch(/cat: can't open '\/nix\/store\/0+-secret\/data': No such file or directory/);
    expect(r.out).toMatch(/can't create .*-busybox\/new: Read-only file system/);
    expect(r.out).toMatch(/can't create .*-file\.txt: Read-only file system/);
    expect(r.out).toMatch(/ls: \/work: No such file or directory/);
    expect(r.out).not.toContain('top secret');
    expect(r.out).toContain('end');
  });

  it('lets the builder write only $out (in the store dir), /build and /tmp', async () => {
    const r = await runIn(
      'echo o > $out && echo b > /build/b && echo t > /tmp/t && echo ok; for p in /x /etc/x /etc/passwd /dev/x /proc/x /nix/x; do (echo x > $p) 2>/dev/null && echo "wrote $p"; done; mkdir /y 2>/dev/null || echo nomkdir',
    );
    expect(r.code).toBe(0);
    expect(r.out).toBe('ok\nnomkdir\n');
    expect(readFileSync(join(r.dirs.storeHostDir, '33333333333333333333333333333333-out'), 'utf8')).toBe('o\n');
    expect(readFileSync(join(r.dirs.buildDir, 'b'), 'utf8')).toBe('b\n');
    expect(statSync(join(r.dirs.buildDir, 'b')).uid).toBe(UID);
  });

  it('passes exactly the given environment, byte-exact, and leaks no fd', async () => {
    const r = await runIn('env | sort; ls /proc/self/fd', { env: { LATIN: 'caf\xe9 \x01\x7f', EMPTY: '' } });
    const env = r.out.split('\n');
    expect(env.slice(0, 5)).toEqual([
      'EMPTY=',
      'LATIN=caf\xe9 \x01\x7f',
      `PATH=${BB}/bin`,
      // Set by the shell itself.
      'PWD=/build',
      'SHLVL=1',
    ]);
    expect(env[5]).toBe('out=/nix/store/33333333333333333333333333333333-out');
    // ls itself has fd 3 open on the directory it lists; nothing else beyond stdio.
    expect(env.slice(6, -1)).toEqual(['0', '1', '2', '3']);
  });

  it('has no network without fixed output, and the host network with it', async () => {
    const server: Server = createServer((s) => s.end('hello from host\n'));
    await new Promise<void>((res) => server.listen(0, '127.0.0.1', res));
    const port = (server.address() as { port: number }).port;
    try {
      const cmd = `cat /proc/net/dev | tail -n +3 | cut -d: -f1; nc -w 2 127.0.0.1 ${port} </dev/null; echo rc=$?`;
      const pure = await runIn(cmd);
      expect(pure.out.split('\n')[0]?.trim()).toBe('lo');
      expect(pure.out).not.toContain('hello from host');
      expect(pure.out).toMatch(/rc=1/);
      const fod = await runIn(`${cmd}; cat /etc/nsswitch.conf; ls /etc`, { fixedOutput: true });
      expect(fod.out).toContain('hello from host');
      expect(fod.out).toContain('hosts: files dns\nservices: files\n');
      expect(fod.out).toContain('nsswitch.conf');
    } finally {
      server.close();
    }
  });

  it('kills a background process when the builder exits', async () => {
    const r = await runIn('sleep 1000 & sleep 1000 & echo $! started');
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/started/);
    // The PID namespace dies with its PID 1: nothing of the slot uid is left, without any sweep.
    await new Promise((res) => setTimeout(res, 100));
    expect(processesOfUid(UID)).toEqual([]);
  });

  it('kill() takes the whole tree down within a second, even with detached grandchildren', async () => {
    const uid = UID + 1;
    const dirs = await prepareSandboxDirs(join(tmp.path, `sb${n++}`), uid, uid, { fixedOutput: false });
    const p = spawnSandbox(
      {
        dirs,
        inputs,
        fixedOutput: false,
        builder: `${BB}/bin/sh`,
        args: ['-c', 'setsid sleep 1000 & (trap "" TERM HUP; sleep 1000) & echo up; sleep 1000'],
        env: { PATH: `${BB}/bin` },
      },
      { uid, gid: uid },
    );
    await new Promise<void>((res) => p.output.once('data', () => res()));
    // Outside, everything runs as the slot uid: the bash wrapper, bwrap and three sleeps (busybox sh execs its last
    // command itself).
    const until = Date.now() + 2000;
    while (processesOfUid(uid).length < 5 && Date.now() < until) await new Promise((res) => setTimeout(res, 10));
    expect(processesOfUid(uid).length).toBe(5);
    const t0 = Date.now();
    p.kill();
    const r = await p.exited;
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(r.signal).toBe('SIGKILL');
    expect(r.swept).toBe(false); // the wrapper was killed too: the caller sweeps
    const deadline = Date.now() + 1000;
    while (processesOfUid(uid).length > 0 && Date.now() < deadline) await new Promise((res) => setTimeout(res, 20));
    expect(processesOfUid(uid)).toEqual([]);
    p.kill(); // after exit: harmless
  });

  it('reports a sandbox setup failure (object not traversable by the slot uid) as not started', async () => {
    const hidden = join(tmp.path, 'hidden');
    mkdirSync(join(hidden, 'obj'), { recursive: true, mode: 0o700 });
    const r = await runIn('echo never', { inputs: [...inputs, { path: SECRET, hostPath: join(hidden, 'obj') }] });
    expect(r.started).toBe(false);
    expect(r.code).not.toBe(0);
    expect(r.out).toMatch(/bwrap: Can't find source path .*hidden\/obj: Permission denied/);
    expect(r.out).not.toContain('never');
  });

  it('refuses a store object missing on disk with a clear error', async () => {
    const dirs = await prepareSandboxDirs(join(tmp.path, `sb${n++}`), UID, UID, { fixedOutput: false });
    expect(() =>
      spawnSandbox(
        {
          dirs,
          inputs: [{ path: SECRET, hostPath: join(tmp.path, 'nope') }],
          fixedOutput: false,
          builder: `${BB}/bin/sh`,
          args: [],
          env: {},
        },
        { uid: UID, gid: UID },
      ),
    ).toThrow(/store object '.*-secret' is missing on disk/);
  });

  it('starts the builder with argv[0] = its base name through the exec helper, leaving no trace', async () => {
    const r = await runIn('echo "$0"; cat /proc/1/comm; readlink /proc/1/exe; ls /proc/self/fd');
    expect(r.code).toBe(0);
    expect(r.out).toBe(`sh\nsh\n${BB}/bin/busybox\n0\n1\n2\n3\n`);
    const plain = await runIn('echo "$0"', { helper: false });
    expect(plain.out).toBe(`${BB}/bin/sh\n`);
  });

  it('reports a builder that cannot be executed', async () => {
    const r = await runIn('true', { builder: `${BB}/bin/nope` });
    expect(r.started).toBe(true);
    expect(r.code).toBe(1);
    expect(r.out).toBe('error: cannot execute the builder\n');
  });

  it('cannot create user namespaces inside', async () => {
    const r = await runIn('unshare -U true && echo made || echo refused');
    expect(r.out).toContain('refused');
  });

  it('after the builder, the wrapper kills every other process of the slot uid, also outside the sandbox', async () => {
    const uid = UID + 3;
    const { spawn } = await import('node:child_process');
    const stray = spawn('/bin/sleep', ['1000'], { uid, gid: uid, detached: true, stdio: 'ignore' });
    await new Promise((res) => stray.once('spawn', res));
    const strayExit = new Promise<NodeJS.Signals | null>((res) => stray.once('exit', (_, sig) => res(sig)));
    try {
      const r = await runIn('echo done', { uid });
      expect(r).toMatchObject({ out: 'done\n', code: 0, started: true, swept: true });
      const timeout = new Promise<string>((res) => setTimeout(() => res('still running after 2 s'), 2000).unref());
      expect(await Promise.race([strayExit, timeout])).toBe('SIGKILL');
      expect(processesOfUid(uid)).toEqual([]);
    } finally {
      stray.kill('SIGKILL'); // (only if the wrapper did not)
    }
  });

  it('leaves nothing behind when making the host directories fails half-way', async () => {
    const top = join(tmp.path, `sb${n++}`);
    await expect(prepareSandboxDirs(top, 2 ** 32, 0, { fixedOutput: false })).rejects.toThrow(/uid/);
    expect(existsSync(top)).toBe(false);
  });

  it('killUidProcesses sweeps stray processes of a uid', async () => {
    const uid = UID + 2;
    const { spawn } = await import('node:child_process');
    const c = spawn('/bin/sleep', ['1000'], { uid, gid: uid, detached: true, stdio: 'ignore' });
    await new Promise((res) => c.once('spawn', res));
    const exited = new Promise((res) => c.once('exit', res));
    expect(processesOfUid(uid)).toEqual([c.pid]);
    expect(await killUidProcesses(uid)).toBe(1);
    await exited;
    expect(processesOfUid(uid)).toEqual([]);
  });
});
