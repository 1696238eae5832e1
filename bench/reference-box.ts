/**
 * The reference box: real Nix (Debian nix-bin) `nix-store --serve --write` / `nix-daemon --stdio` behind Debian's
 * OpenSSH sshd on 127.0.0.1, with its own empty /nix bind-mounted in a private mount namespace (as
 * ../shared/tools/reference-box.sh does, but in the harness's temp dir and torn down at the end). Clients log in as
 * root with one key; every ssh alias `ref-*` in the shared ssh config reaches it.
 */
import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { freePort, killGroup, lastLines, onCleanup, run, spawnTracked, waitExit } from './proc.js';
import { commOf, descendantsOf, mountNsOf, pidsInMountNs } from './procfs.js';

export interface ReferenceBox {
  port: number;
  pid: number;
  /** `[127.0.0.1]:port key` for known_hosts. */
  knownHostsLine: string;
  /** ssh_config lines for the `ref-*` aliases. */
  sshConfig: string;
  /** Pids of the box's nix-store / nix-daemon processes (one per connection). */
  nixPids(): number[];
  /**
   * Give the box an empty store (between repetitions: nothing uploaded before is valid any more). The old store is
   * moved aside, not deleted: deleting thousands of files mid-run slows every later file creation in the same ext4
   * block groups (see `empty` below). The temp dir's cleanup removes them at the end.
   */
  empty(env: NodeJS.ProcessEnv): Promise<void>;
  stop(): Promise<void>;
}

export async function startReferenceBox(dir: string): Promise<ReferenceBox> {
  mkdirSync(join(dir, 'nix'), { recursive: true });
  mkdirSync('/run/sshd', { recursive: true });
  const hostKey = join(dir, 'host_key');
  const userKey = join(dir, 'user_key');
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'reference-box', '-f', hostKey]);
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'bench', '-f', userKey]);
  writeFileSync(join(dir, 'authorized_keys'), readFileSync(`${userKey}.pub`));
  const port = await freePort();
  const sshdConfig = join(dir, 'sshd_config');
  // The box is offline: no substituters (otherwise every remote build first tries cache.nixos.org).
  writeFileSync(
    sshdConfig,
    [
      `Port ${port}`,
      'ListenAddress 127.0.0.1',
      `HostKey ${hostKey}`,
      `AuthorizedKeysFile ${join(dir, 'authorized_keys')}`,
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'PermitRootLogin prohibit-password',
      'StrictModes no',
      `PidFile ${join(dir, 'sshd.pid')}`,
      'UsePAM no',
      'MaxStartups 1000',
      'MaxSessions 1000',
      'PrintMotd no',
      'SetEnv NIX_REMOTE= NIX_CONFIG="substituters ="',
      '',
    ].join('\n'),
  );
  const nixDir = join(dir, 'nix');
  let generation = 0;
  const child: ChildProcess = spawnTracked(
    'unshare',
    [
      '-m',
      '--propagation',
      'private',
      'sh',
      '-c',
      `mount --bind "$0" /nix && exec /usr/sbin/sshd -D -e -f "$1"`,
      nixDir,
      sshdConfig,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  const pid = child.pid!;
  const stop = async () => {
    // Per-connection sshd and nix processes outlive the listener: kill everything in the box's mount namespace and
    // every descendant (nix-store / nix-daemon unshare their own mount namespace).
    const ns = mountNsOf(pid);
    const pids = [
      ...new Set([...(ns && ns !== mountNsOf(process.pid) ? pidsInMountNs(ns) : []), ...descendantsOf(pid)]),
    ];
    killGroup(child, 'SIGTERM');
    for (const p of pids) {
      try {
        process.kill(p, 'SIGTERM');
      } catch {}
    }
    if (!(await waitExit(child, 3000))) killGroup(child, 'SIGKILL');
    for (const p of pids) {
      try {
        process.kill(p, 'SIGKILL');
      } catch {}
    }
  };
  const unregister = onCleanup('reference sshd', stop);
  let stderr = '';
  child.stderr!.setEncoding('utf8');
  const ready = new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`reference sshd did not start: ${lastLines(stderr, 5)}`)), 15_000);
    child.stderr!.on('data', (d: string) => {
      stderr += d;
      if (stderr.length > 65536) stderr = stderr.slice(-32768);
      if (/Server listening on/.test(stderr)) {
        clearTimeout(t);
        resolve();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`reference sshd exited ${code}: ${lastLines(stderr, 5)}`));
    });
  });
  await ready;
  const knownHostsLine = `[127.0.0.1]:${port} ${readFileSync(`${hostKey}.pub`, 'utf8').trim().split(' ').slice(0, 2).join(' ')}`;
  const sshConfig = `Host ref ref-*\n  HostName 127.0.0.1\n  Port ${port}\n  User root\n  IdentityFile ${userKey}\n`;
  return {
    port,
    pid,
    knownHostsLine,
    sshConfig,
    nixPids: () => {
      return descendantsOf(pid).filter((p) => {
        const c = commOf(p);
        return c === 'nix-store' || c === 'nix-daemon';
      });
    },
    empty: async (env) => {
      // On ext4 without a journal (this machine's), creating a file scans past every inode of its block group deleted
      // in the last 5 s, or 305 s while that inode's table block is dirty (kernel: recently_deleted). After a
      // `nix-store --gc` of 2,000 paths that slowed the next copy's file creation, on this box and on buildbox (same
      // temp dir, same block groups), by up to ~1 ms per file. So the store and its database are renamed away, and
      // an empty one is set up (a GC of nothing creates the database), before anything is timed.
      const old = join(dir, 'old', String(++generation));
      mkdirSync(old, { recursive: true });
      for (const d of ['store', 'var']) {
        if (existsSync(join(nixDir, d))) renameSync(join(nixDir, d), join(old, d));
      }
      await run('ssh', [...sshOptsOf(env), 'ref', 'nix-store --gc'], { env, timeoutMs: 120_000 });
    },
    stop: async () => {
      unregister();
      await stop();
    },
  };
}

/** `-F file` from NIX_SSHOPTS, for running ssh directly with the same config. */
export function sshOptsOf(env: NodeJS.ProcessEnv): string[] {
  return (env.NIX_SSHOPTS ?? '').split(/\s+/).filter((s) => s.length > 0);
}
