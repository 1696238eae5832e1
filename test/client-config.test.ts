/**
 * Issue 8, `buildbox client-config`: what it prints is parsed back, the NixOS snippet evaluates with the real Nix, and
 * the machines line / nix.conf line / ssh stanza, used as printed, make the real Nix 2.8 and 2.26 clients build on a
 * live box — with the host key pinned only by the machines line's base64 field (no known_hosts entry anywhere).
 */
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { base64HostKey, parseMachines } from '../src/client-config.js';
import { startTestBox, type TestBox } from './helpers/box.js';
import { compiledCli } from './helpers/cli.js';
import { run } from './helpers/exec.js';
import { CLIENTS, nixEnv } from './helpers/nix.js';

/** Kill (by pid) the ssh processes started for this test: ControlPersist masters outlive the commands. */
function killSshMentioning(dir: string): void {
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (argv[0]?.endsWith('ssh') && argv.some((a) => a.includes(dir))) process.kill(Number(pid), 'SIGKILL');
    } catch {
      // gone already
    }
  }
}

const SYSTEM = process.arch === 'x64' ? 'x86_64-linux' : 'aarch64-linux';
let tb: TestBox;
let cli: string;
let boxToml: string;
const nonce = () => randomBytes(5).toString('hex');

beforeAll(async () => {
  [tb, cli] = await Promise.all([
    startTestBox({ users: ['alice', 'bob'], config: { maxJobs: 3, supportedFeatures: ['benchmark', 'big-parallel'] } }),
    compiledCli(),
  ]);
  tb.helloBox();
  boxToml = join(tb.dir, 'box.toml');
  const c = tb.box.config;
  writeFileSync(
    boxToml,
    [
      `port = ${tb.port}`,
      `state-dir = ${JSON.stringify(c.stateDir)}`,
      `host-name = "testbox"`,
      `max-jobs = ${c.maxJobs}`,
      `supported-features = ${JSON.stringify(c.supportedFeatures)}`,
      `system = ${JSON.stringify(c.system)}`,
      '[registry]',
      `path = ${JSON.stringify(c.registry.path)}`,
      '',
    ].join('\n'),
  );
});
afterAll(async () => {
  if (tb) killSshMentioning(tb.dir);
  await tb?.stop();
});

async function clientConfig(args: string[], allowFail = false) {
  return run(process.execPath, [cli, 'client-config', ...args], { allowFail, env: { ...process.env, HOME: tb.dir } });
}

function localArgs(user: string, protocol: string, extra: string[] = []): string[] {
  return [
    '-c',
    boxToml,
    '--user',
    user,
    '--host',
    '127.0.0.1',
    '--port',
    String(tb.port),
    '--key',
    tb.users[user]!.key,
    '--protocol',
    protocol,
    '--control-path',
    join(tb.dir, 'cm-%C'),
    ...extra,
  ];
}

describe('client-config output', () => {
  it('prints a machines line with all eight fields that parses back to the box', async () => {
    const r = await clientConfig(localArgs('alice', 'ssh-ng', ['--format', 'machines']));
    const line = r.stdout.trim();
    expect(line.split(' ')).toHaveLength(8);
    const [m, ...more] = parseMachines(line);
    expect(more).toEqual([]);
    expect(m).toEqual({
      uri: 'ssh-ng://alice@127.0.0.1',
      protocol: 'ssh-ng',
      user: 'alice',
      host: '127.0.0.1',
      systems: [SYSTEM],
      sshKey: tb.users.alice!.key,
      maxJobs: 3,
      speedFactor: 1,
      supportedFeatures: ['benchmark', 'big-parallel'],
      mandatoryFeatures: [],
      publicHostKey: tb.box.hostKey.publicKey,
    });
    // The 8th field is base64 of the whole "ssh-ed25519 AAAA…" line, as Nix expects.
    expect(line.split(' ')[7]).toBe(Buffer.from(tb.box.hostKey.publicKey).toString('base64'));
    expect(base64HostKey(tb.box.hostKey.publicKey)).toBe(line.split(' ')[7]);
  });

  it('asked over SSH (--remote: ssh-keyscan + buildbox-info) prints the same line as on the box', async () => {
    const local = await clientConfig(localArgs('alice', 'ssh', ['--format', 'machines']));
    const remote = await clientConfig([
      '--remote',
      '--user',
      'alice',
      '--host',
      '127.0.0.1',
      '--port',
      String(tb.port),
      '--key',
      tb.users.alice!.key,
      '--protocol',
      'ssh',
      '--ssh-config',
      '/dev/null',
      '--expect-fingerprint',
      tb.box.hostKey.fingerprint,
      '--format',
      'machines',
    ]);
    expect(remote.stdout).toBe(local.stdout);
    // A wrong expected fingerprint stops it with one clear line.
    const bad = await clientConfig(
      [
        '--remote',
        '--user',
        'alice',
        '--host',
        '127.0.0.1',
        '--port',
        String(tb.port),
        '--key',
        tb.users.alice!.key,
        '--ssh-config',
        '/dev/null',
        '--expect-fingerprint',
        'SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA',
      ],
      true,
    );
    expect(bad.code).not.toBe(0);
    expect(bad.stdout).toBe('');
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toMatch(/HOST KEY MISMATCH/);
  });

  it('prints a NixOS snippet that the real Nix evaluates to the same settings', async () => {
    const r = await clientConfig(localArgs('alice', 'ssh-ng', ['--format', 'nixos']));
    const file = join(tb.dir, `nixos-${nonce()}.nix`);
    writeFileSync(file, r.stdout);
    const ev = await run('nix-instantiate', ['--eval', '--strict', '--json', file], { env: nixEnv() });
    const v = JSON.parse(ev.stdout);
    expect(v.nix.distributedBuilds).toBe(true);
    expect(v.nix.buildMachines).toEqual([
      {
        hostName: '127.0.0.1',
        protocol: 'ssh-ng',
        systems: [SYSTEM],
        maxJobs: 3,
        speedFactor: 1,
        supportedFeatures: ['benchmark', 'big-parallel'],
        mandatoryFeatures: [],
        sshUser: 'alice',
        sshKey: tb.users.alice!.key,
        publicHostKey: base64HostKey(tb.box.hostKey.publicKey),
      },
    ]);
    const kh = Object.values(v.programs.ssh.knownHosts) as Array<{ hostNames: string[]; publicKey: string }>;
    expect(kh).toEqual([{ hostNames: ['127.0.0.1', `[127.0.0.1]:${tb.port}`], publicKey: tb.box.hostKey.publicKey }]);
    const stanza = await clientConfig(localArgs('alice', 'ssh-ng', ['--format', 'ssh-config']));
    expect(v.programs.ssh.extraConfig).toBe(stanza.stdout);
    for (const k of [
      'Host 127.0.0.1',
      `Port ${tb.port}`,
      'User alice',
      'IdentitiesOnly yes',
      'ControlMaster auto',
      'ControlPersist',
    ]) {
      expect(stanza.stdout).toContain(k);
    }
  });

  it('default output shows every format with a line of explanation each', async () => {
    const r = await clientConfig(localArgs('alice', 'ssh-ng'));
    const machines = (await clientConfig(localArgs('alice', 'ssh-ng', ['--format', 'machines']))).stdout.trim();
    expect(r.stdout).toContain(`builders = ${machines}\n`);
    expect(r.stdout).toContain(`\n${machines}\n`);
    expect(r.stdout).toMatch(/# 1\. NixOS/);
    expect(r.stdout).toMatch(/# 2\. .*nix\.conf/);
    expect(r.stdout).toMatch(/# 3\. .*machines/);
    expect(r.stdout).toMatch(/# 4\. .*ssh\/config/);
    expect(r.stdout).toContain(tb.box.hostKey.fingerprint);
    const bad = await clientConfig(['--user', 'alice', '--state-dir', join(tb.dir, 'nothing-here')], true);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/^buildbox: no box state in .*nothing-here: run this on the box/);
  });
});

describe.each(CLIENTS)('the printed settings build with $name', (client) => {
  /** ssh stanza + machines line for `user`/`protocol`, as printed, written to files in the test dir. */
  async function setup(user: string, protocol: string, tag: string) {
    const cfg = join(tb.dir, `ssh-${tag}.conf`);
    writeFileSync(cfg, (await clientConfig(localArgs(user, protocol, ['--format', 'ssh-config']))).stdout);
    const machines = join(tb.dir, `machines-${tag}`);
    const line = (await clientConfig(localArgs(user, protocol, ['--format', 'machines']))).stdout;
    writeFileSync(machines, line);
    const conf = (await clientConfig(localArgs(user, protocol, ['--format', 'nix-conf']))).stdout;
    return { cfg, machines, line: line.trim(), conf: conf.trim() };
  }

  const build = (greeting: string, env: NodeJS.ProcessEnv, builders: string[]) =>
    tb.nix(
      client.run,
      'nix-build',
      [
        tb.helloBox(),
        '--argstr',
        'greeting',
        greeting,
        '--no-out-link',
        '--max-jobs',
        '0',
        ...builders,
        '--option',
        'builders-use-substitutes',
        'false',
      ],
      { allowFail: true, env },
    );

  it('the machines file (ssh://, host key pinned by the line) builds on the box', async () => {
    const tag = `${client.name}-ssh-${nonce()}`;
    const s = await setup('alice', 'ssh', tag);
    const greeting = `hello-${tag}`;
    const r = await build(greeting, { NIX_SSHOPTS: `-F ${s.cfg}` }, ['--builders', `@${s.machines}`]);
    if (r.code !== 0) throw new Error(`build failed:\n${r.stderr}`);
    const out = r.stdout.trim();
    expect(out).toMatch(/^\/nix\/store\/[0-9a-z]{32}-hello-box$/);
    expect(tb.box.store.queryPathInfo('alice', out)).toBeDefined();
    // The same line with another host key in its last field is refused: the field is what lets ssh in.
    const other = (await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(tb.dir, `other-${tag}`)])).code;
    expect(other).toBe(0);
    const otherKey = readFileSync(join(tb.dir, `other-${tag}.pub`), 'utf8')
      .trim()
      .split(' ')
      .slice(0, 2)
      .join(' ');
    const fields = s.line.split(' ');
    fields[7] = base64HostKey(otherKey);
    writeFileSync(s.machines, `${fields.join(' ')}\n`);
    const refused = await build(`${greeting}-2`, { NIX_SSHOPTS: `-F ${s.cfg} -o ControlPath=none` }, [
      '--builders',
      `@${s.machines}`,
    ]);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/host key|Host key verification failed|REMOTE HOST IDENTIFICATION/i);
  });

  it('the nix.conf builders line (ssh-ng://) builds on the box', async () => {
    const tag = `${client.name}-ng-${nonce()}`;
    const s = await setup('bob', 'ssh-ng', tag);
    const greeting = `hello-${tag}`;
    const r = await build(
      greeting,
      { NIX_SSHOPTS: `-F ${s.cfg}`, NIX_CONFIG: `${nixEnv().NIX_CONFIG}${s.conf}\n` },
      [],
    );
    if (r.code !== 0) throw new Error(`build failed:\n${r.stderr}`);
    const out = r.stdout.trim();
    expect(out).toMatch(/^\/nix\/store\/[0-9a-z]{32}-hello-box$/);
    expect(tb.box.store.queryPathInfo('bob', out)).toBeDefined();
    // The ssh stanza's ControlMaster kept one connection for the box: close it the way a user would.
    await run('ssh', ['-F', s.cfg, '-O', 'exit', '127.0.0.1'], { allowFail: true });
  });
});
