/**
 * A real buildbox for end-to-end tests: a temp dir with a users registry (keys made by ssh-keygen), the box started
 * in-process on 127.0.0.1 port 0, and an ssh config that both Nix clients use through NIX_SSHOPTS
 * (`ssh://alice@box`). The temp dir is bound into the trixie root for the Nix 2.26 client.
 */
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type Box, startBox } from '../../src/box.js';
import { type Config, defaultConfig } from '../../src/config.js';
import { knownHostsLine } from '../../src/host-key.js';
import { silentLogger } from '../../src/logger.js';
import { run, tempDir } from './exec.js';
import { type NixClient, nix28, nix226, SHARED } from './nix.js';

export interface TestUser {
  name: string;
  key: string;
  publicKey: string;
}

export interface TestBox {
  box: Box;
  dir: string;
  port: number;
  users: Record<string, TestUser>;
  sshConfig: string;
  /** Environment for a Nix client to reach the box as `ssh://USER@box`. */
  env: NodeJS.ProcessEnv;
  /** Run a Nix client (2.8 or 2.26) with that environment. */
  nix(
    client: NixClient,
    cmd: string,
    args: string[],
    opts?: { allowFail?: boolean; env?: NodeJS.ProcessEnv },
  ): ReturnType<NixClient>;
  writeRegistry(users: Array<{ name: string; extra?: string }>): void;
  /** A client-side store root in the temp dir (bound into the trixie root too). */
  clientStore(name: string): string;
  /** A copy of shared/examples/hello-box.nix with its busybox dir, in the temp dir. */
  helloBox(): string;
  /** Stop the box and start it again on the same state dir (and port), e.g. to check what survives a restart. */
  restart(config?: Partial<Config>): Promise<void>;
  stop(): Promise<void>;
}

let uidCounter = 0;
function nextUidBase(): number {
  return 40000 + (process.pid % 400) * 100 + (uidCounter++ % 10) * 10;
}

export async function makeUserKey(dir: string, name: string): Promise<TestUser> {
  const key = join(dir, `id_${name}`);
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', name, '-f', key]);
  return { name, key, publicKey: readFileSync(`${key}.pub`, 'utf8').trim() };
}

export async function startTestBox(
  opts: {
    users?: string[];
    config?: Partial<Config>;
    registryExtra?: Record<string, string>;
    /** Runs after the users' keys exist and before the box starts; may add config (e.g. a git registry). */
    prepare?: (dir: string, users: Record<string, TestUser>) => Promise<Partial<Config>>;
  } = {},
): Promise<TestBox> {
  const t = tempDir('buildbox-e2e-');
  const dir = t.path;
  // Build users (unprivileged slot uids) must be able to reach the state dir, as on a real box under /var/lib.
  chmodSync(dir, 0o755);
  const regDir = join(dir, 'registry');
  mkdirSync(join(regDir, 'keys'), { recursive: true });
  const users: Record<string, TestUser> = {};
  for (const name of opts.users ?? ['alice', 'bob']) users[name] = await makeUserKey(dir, name);

  const writeRegistry = (list: Array<{ name: string; extra?: string }>) => {
    let text = '# test registry\n{\n';
    for (const u of list) {
      const user = users[u.name];
      if (user) writeFileSync(join(regDir, 'keys', u.name), `${user.publicKey}\n`);
      text += `  ${u.name} = { trusted = true; keys = ./keys/${u.name}; ${u.extra ?? opts.registryExtra?.[u.name] ?? ''}};\n`;
    }
    text += '}\n';
    writeFileSync(join(regDir, 'users.nix'), text);
  };
  writeRegistry(Object.keys(users).map((name) => ({ name })));

  const config: Config = {
    ...defaultConfig(dir),
    port: 0,
    stateDir: join(dir, 'state'),
    registry: { path: regDir, git: null, branch: 'main', interval: 300 },
    maxJobs: 4,
    statusPort: 0,
    // Each box gets its own build uids: the builder sweeps every process of a slot uid when a build ends, so two
    // boxes (in parallel test files) sharing uids would kill each other's builds.
    buildUidBase: nextUidBase(),
    ...opts.config,
    ...(opts.prepare ? await opts.prepare(dir, users) : {}),
  };
  let box = await startBox(config, silentLogger());
  const port = box.port;
  const knownHosts = join(dir, 'known_hosts');
  writeFileSync(knownHosts, `${knownHostsLine(box.hostKey, '127.0.0.1', port)}\n`);
  const sshConfig = join(dir, 'ssh_config');
  let cfg = '';
  for (const u of Object.values(users)) {
    cfg += `Match user ${u.name} host box\n  IdentityFile ${u.key}\n`;
  }
  cfg += `Host box\n  HostName 127.0.0.1\n  Port ${port}\n  UserKnownHostsFile ${knownHosts}\n  StrictHostKeyChecking yes\n  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n`;
  writeFileSync(sshConfig, cfg);
  const env = { NIX_SSHOPTS: `-F ${sshConfig}` };

  const tb: TestBox = {
    box,
    dir,
    port,
    users,
    sshConfig,
    env,
    nix: (client, cmd, args, o = {}) =>
      client === nix226
        ? nix226(cmd, args, { binds: [dir], allowFail: o.allowFail, env: { ...env, ...o.env } })
        : nix28(cmd, args, { allowFail: o.allowFail, env: { ...env, ...o.env } }),
    writeRegistry,
    clientStore: (name: string) => {
      const p = join(dir, 'client', name);
      mkdirSync(p, { recursive: true });
      return p;
    },
    helloBox: () => {
      const d = join(dir, 'hello');
      mkdirSync(join(d, 'bb', 'bin'), { recursive: true });
      copyFileSync(join(SHARED, 'examples', 'hello-box.nix'), join(d, 'hello-box.nix'));
      if (!existsSync(join(d, 'bb', 'bin', 'busybox'))) {
        copyFileSync('/bin/busybox', join(d, 'bb', 'bin', 'busybox'));
        symlinkSync('busybox', join(d, 'bb', 'bin', 'sh'));
      }
      return join(d, 'hello-box.nix');
    },
    restart: async (more = {}) => {
      await box.close();
      box = await startBox({ ...config, ...more, port }, silentLogger());
      tb.box = box;
    },
    stop: async () => {
      await box.close();
      t.cleanup();
    },
  };
  return tb;
}

export { nix28, nix226 };
