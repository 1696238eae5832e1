/**
 * buildbox under test: the real `buildbox serve` as its own process (`node dist/src/cli.js serve --config <toml>`), so
 * its memory can be read from /proc and it can be profiled with `node --cpu-prof`. A temp registry holds a pool of
 * bench users (one ssh key each); every user has an ssh alias `box-<user>` in the shared ssh config. A fresh user sees
 * an empty store (per-user views), which is how a repetition starts from nothing without restarting the box.
 */
import type { ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { killGroup, lastLines, onCleanup, pool, run, spawnTracked, waitExit } from './proc.js';

export const CLI_JS = fileURLToPath(new URL('../src/cli.js', import.meta.url));

export interface BuildboxOptions {
  users: number;
  maxJobs: number;
  /** Directory for `--cpu-prof` output, or null. */
  cpuProfDir: string | null;
  logLevel: string;
}

export interface BuildboxBox {
  pid: number;
  port: number;
  knownHostsLine: string;
  sshConfig: string;
  /** Hand out the next unused user; its alias is `box-<name>`. */
  takeUser(): string;
  usersLeft(): number;
  logFile: string;
  stop(): Promise<void>;
}

export async function startBuildbox(dir: string, opts: BuildboxOptions): Promise<BuildboxBox> {
  if (!existsSync(CLI_JS)) throw new Error(`${CLI_JS} is missing: run npm run build`);
  const regDir = join(dir, 'registry');
  const keysDir = join(dir, 'keys');
  mkdirSync(join(regDir, 'keys'), { recursive: true });
  mkdirSync(keysDir, { recursive: true });
  const names = Array.from({ length: opts.users }, (_, i) => `bench${String(i + 1).padStart(3, '0')}`);
  await pool(names, 8, async (name) => {
    const key = join(keysDir, name);
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', name, '-f', key]);
  });
  let users = '# bench users\n{\n';
  let sshConfig = '';
  for (const name of names) {
    writeFileSync(join(regDir, 'keys', name), readFileSync(join(keysDir, `${name}.pub`)));
    users += `  ${name} = { trusted = true; keys = ./keys/${name}; };\n`;
    sshConfig += `Host box-${name}\n  User ${name}\n  IdentityFile ${join(keysDir, name)}\n`;
  }
  users += '}\n';
  writeFileSync(join(regDir, 'users.nix'), users);
  const configFile = join(dir, 'buildbox.toml');
  writeFileSync(
    configFile,
    [
      'listen = "127.0.0.1"',
      'port = 0',
      `state-dir = ${JSON.stringify(join(dir, 'state'))}`,
      `max-jobs = ${opts.maxJobs}`,
      '[registry]',
      `path = ${JSON.stringify(regDir)}`,
      '[status]',
      'enabled = false',
      '',
    ].join('\n'),
  );
  // Extra node flags for experiments, e.g. BENCH_BUILDBOX_NODE_ARGS='--trace-gc' (output goes to buildbox.log).
  const nodeArgs = [
    '--enable-source-maps',
    '--max-semi-space-size=4', // as the `buildbox` command runs (src/cli.ts's interpreter line, scripts/start.sh)
    ...(process.env.BENCH_BUILDBOX_NODE_ARGS ?? '').split(/\s+/).filter(Boolean),
  ];
  if (opts.cpuProfDir) nodeArgs.push('--cpu-prof', '--cpu-prof-dir', opts.cpuProfDir);
  const logFile = join(dir, 'buildbox.log');
  const log = createWriteStream(logFile);
  const child: ChildProcess = spawnTracked(process.execPath, [...nodeArgs, CLI_JS, 'serve', '--config', configFile], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, BUILDBOX_LOG_LEVEL: opts.logLevel },
  });
  child.stdout!.pipe(log, { end: false });
  const stop = async () => {
    // SIGTERM: the box closes and the process ends by itself (which also writes the CPU profile).
    killGroup(child, 'SIGTERM');
    if (!(await waitExit(child, 15_000))) {
      process.stderr.write('bench: buildbox did not exit within 15 s of SIGTERM; killing it\n');
      killGroup(child, 'SIGKILL');
      await waitExit(child, 2000);
    }
    log.end();
  };
  const unregister = onCleanup('buildbox serve', stop);
  let stderr = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (d: string) => {
    log.write(d);
    if (stderr.length < 65536) stderr += d;
  });
  const { port, known } = await new Promise<{ port: number; known: string }>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`buildbox serve did not start: ${lastLines(stderr, 5)}`)), 30_000);
    const check = () => {
      const p = /buildbox listening on [^\s]+:(\d+)/.exec(stderr);
      const k = /known_hosts line:\s+(\S+ \S+ \S+)/.exec(stderr);
      if (p && k) {
        clearTimeout(t);
        child.stderr!.off('data', check);
        resolve({ port: Number(p[1]), known: k[1]! });
      }
    };
    child.stderr!.on('data', check);
    child.once('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`buildbox serve exited ${code}: ${lastLines(stderr, 5)}`));
    });
  });
  sshConfig += `Host box box-*\n  HostName 127.0.0.1\n  Port ${port}\n`;
  let next = 0;
  return {
    pid: child.pid!,
    port,
    knownHostsLine: known,
    sshConfig,
    takeUser: () => {
      const n = names[next++];
      if (!n) throw new Error(`out of bench users (${names.length}); raise the pool size`);
      return n;
    },
    usersLeft: () => names.length - next,
    logFile,
    stop: async () => {
      unregister();
      await stop();
    },
  };
}
