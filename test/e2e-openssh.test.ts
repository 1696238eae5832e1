/**
 * Issue 8, the OpenSSH front door end to end: Debian's sshd on 127.0.0.1 configured with the shipped
 * examples/sshd_config.d/buildbox.conf (only paths, the group and the port changed), its AuthorizedKeysCommand running
 * `buildbox authorized-keys %u` as nobody, and `buildbox session USER` as the forced command, talking to the box through
 * <stateDir>/session.sock. Real Nix 2.8 and 2.26 clients copy and build through it; a user certificate signed by a
 * registry `cert-authority` key is accepted; doctor passes through it; with the box gone the forced command says so.
 *
 * sshd needs unix accounts for the registry users: they exist only in a private mount namespace, where copies of
 * /etc/passwd, /etc/group and /etc/shadow with alice, bob and dave (group bbxtest, which owns the session socket)
 * are bind-mounted. sshd and every process in that namespace are killed at the end.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  copyFileSync,
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBox, type TestBox } from './helpers/box.js';
import { compiledCli } from './helpers/cli.js';
import { run } from './helpers/exec.js';
import { CLIENTS, nix28, REPO } from './helpers/nix.js';
import { skLine } from './helpers/registry-fixtures.js';

const GID = 61000;
const UIDS: Record<string, number> = { alice: 61001, bob: 61002, dave: 61003 };
const SYSTEM = process.arch === 'x64' ? 'x86_64-linux' : 'aarch64-linux';

let tb: TestBox;
let cli: string;
/** Root-owned 0755 directory under /run (sshd refuses an AuthorizedKeysCommand below a world-writable /tmp). */
let sshdDir: string;
let sshd: ChildProcess | undefined;
let sshdNs: string | undefined;
let port: number;
let clientCfg: string;
let certCfg: string;
let certKey: string;
let strayKey: string;
const nonce = () => randomBytes(5).toString('hex');

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const p = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return p;
}

beforeAll(async () => {
  let caPub = '';
  const sk = skLine('ed25519', 'bob@yubikey');
  [tb, cli] = await Promise.all([
    startTestBox({
      users: ['alice', 'bob', 'dave'],
      prepare: async (dir, users) => {
        // The registry: alice trusts a user CA for herself, bob also has a FIDO key; dave is no registry user.
        const ca = join(dir, 'user_ca');
        await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'user-ca', '-f', ca]);
        caPub = readFileSync(`${ca}.pub`, 'utf8').trim().split(' ').slice(0, 2).join(' ');
        writeFileSync(
          join(dir, 'registry', 'keys', 'alice'),
          `${users.alice!.publicKey}\ncert-authority,principals="alice" ${caPub} ca\n`,
        );
        writeFileSync(join(dir, 'registry', 'keys', 'bob'), `${users.bob!.publicKey}\n${sk}\n`);
        writeFileSync(
          join(dir, 'registry', 'users.nix'),
          '{\n  alice = { trusted = true; keys = ./keys/alice; };\n  bob = { trusted = true; keys = ./keys/bob; };\n}\n',
        );
        return {};
      },
    }),
    compiledCli(),
  ]);
  tb.helloBox();
  // A certificate for a key the registry has never seen, signed by the CA, for principal alice.
  certKey = join(tb.dir, 'id_cert');
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'laptop', '-f', certKey]);
  await run('ssh-keygen', [
    '-q',
    '-s',
    join(tb.dir, 'user_ca'),
    '-I',
    'alice-laptop',
    '-n',
    'alice',
    '-V',
    '-5m:+1h',
    `${certKey}.pub`,
  ]);
  strayKey = join(tb.dir, 'id_stray');
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'stray', '-f', strayKey]);

  // The session socket belongs to the box's group, which the accounts are in (as with Group=buildbox in systemd).
  chownSync(join(tb.box.config.stateDir, 'session.sock'), 0, GID);

  sshdDir = mkdtempSync('/run/bbx-sshd-');
  chmodSync(sshdDir, 0o755);
  const boxToml = join(tb.dir, 'box.toml');
  writeFileSync(
    boxToml,
    `state-dir = ${JSON.stringify(tb.box.config.stateDir)}\n[registry]\npath = ${JSON.stringify(tb.box.config.registry.path)}\n`,
  );
  // What `npm install -g` would put in /usr/local/bin.
  const wrapper = join(sshdDir, 'buildbox');
  writeFileSync(wrapper, `#!/bin/sh\nexec ${process.execPath} ${cli} "$@"\n`, { mode: 0o755 });
  const fragment = readFileSync(join(REPO, 'examples', 'sshd_config.d', 'buildbox.conf'), 'utf8');
  const adapted = fragment
    .replace('Match Group buildbox', 'Match Group bbxtest')
    .replace(
      '/usr/local/bin/buildbox authorized-keys --config /etc/buildbox/buildbox.toml',
      `${wrapper} authorized-keys --config ${boxToml}`,
    );
  expect(adapted).not.toBe(fragment);
  writeFileSync(join(sshdDir, 'buildbox.conf'), adapted);
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(sshdDir, 'host_key')]);
  port = await freePort();
  const cfg = join(sshdDir, 'sshd_config');
  writeFileSync(
    cfg,
    [
      `Port ${port}`,
      'ListenAddress 127.0.0.1',
      `HostKey ${join(sshdDir, 'host_key')}`,
      `PidFile ${join(sshdDir, 'sshd.pid')}`,
      'UsePAM no',
      'PermitRootLogin no',
      'AuthorizedKeysFile none',
      'PasswordAuthentication no',
      'LogLevel VERBOSE',
      `Include ${join(sshdDir, 'buildbox.conf')}`,
      '',
    ].join('\n'),
  );
  const passwd = join(sshdDir, 'passwd');
  const group = join(sshdDir, 'group');
  const shadow = join(sshdDir, 'shadow');
  writeFileSync(
    passwd,
    readFileSync('/etc/passwd', 'utf8') +
      Object.entries(UIDS)
        .map(([n, u]) => `${n}:x:${u}:${GID}::/:/bin/sh\n`)
        .join(''),
  );
  writeFileSync(group, `${readFileSync('/etc/group', 'utf8')}bbxtest:x:${GID}:\n`);
  writeFileSync(
    shadow,
    readFileSync('/etc/shadow', 'utf8') +
      Object.keys(UIDS)
        .map((n) => `${n}:*:19000:0:99999:7:::\n`)
        .join(''),
    {
      mode: 0o600,
    },
  );
  if (!existsSync('/run/sshd')) await run('mkdir', ['-p', '/run/sshd']);
  const script =
    'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/group && mount --bind "$3" /etc/shadow && /usr/sbin/sshd -t -f "$4" && exec /usr/sbin/sshd -D -e -f "$4"';
  const child = spawn(
    'unshare',
    ['--mount', '--propagation', 'private', 'sh', '-c', script, 'sh', passwd, group, shadow, cfg],
    {
      stdio: ['ignore', 'ignore', 'pipe'],
    },
  );
  sshd = child;
  let log = '';
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`sshd did not start:\n${log}`)), 15_000);
    child.stderr!.on('data', (d: Buffer) => {
      log += d.toString();
      if (log.includes('Server listening on')) {
        clearTimeout(t);
        resolve();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`sshd exited ${code}:\n${log}`));
    });
  });
  sshdNs = readlinkSync(`/proc/${child.pid}/ns/mnt`);
  child.stderr!.on('data', (d: Buffer) => {
    if (process.env.BUILDBOX_SSHD_LOG) process.stderr.write(d);
  });

  const knownHosts = join(tb.dir, 'openssh_known_hosts');
  writeFileSync(knownHosts, `[127.0.0.1]:${port} ${readFileSync(join(sshdDir, 'host_key.pub'), 'utf8').trim()}\n`);
  const common = `  HostName 127.0.0.1\n  Port ${port}\n  UserKnownHostsFile ${knownHosts}\n  StrictHostKeyChecking yes\n  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n`;
  clientCfg = join(tb.dir, 'openssh_client_config');
  writeFileSync(
    clientCfg,
    `${Object.values(tb.users)
      .map((u) => `Match user ${u.name} host obox\n  IdentityFile ${u.key}\n`)
      .join('')}Host obox\n${common}`,
  );
  certCfg = join(tb.dir, 'openssh_cert_config');
  writeFileSync(
    certCfg,
    `Host cbox\n  User alice\n  IdentityFile ${certKey}\n  CertificateFile ${certKey}-cert.pub\n${common}`,
  );
});

/** Processes in sshd's mount namespace other than the listener itself. */
function sessionPids(): number[] {
  const out: number[] = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const n = Number(pid);
      if (n !== sshd?.pid && n !== process.pid && readlinkSync(`/proc/${pid}/ns/mnt`) === sshdNs) out.push(n);
    } catch {
      // gone
    }
  }
  return out;
}

afterAll(async () => {
  // Let the per-connection sshd processes finish (their parent, the listener, reaps them), kill stragglers, then the
  // listener: orphans would be reparented to a PID 1 that may not reap them.
  if (sshdNs) {
    for (let i = 0; i < 50 && sessionPids().length > 0; i++) await new Promise((r) => setTimeout(r, 100));
    for (const pid of sessionPids().reverse()) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  if (sshd && sshd.exitCode === null) {
    const exited = new Promise((r) => sshd!.once('exit', r));
    sshd.kill('SIGKILL');
    await exited;
  }
  await tb?.stop();
  if (sshdDir) rmSync(sshdDir, { recursive: true, force: true });
});

const ssh = (cfg: string, dest: string, command: string, input = '') =>
  run('ssh', ['-F', cfg, dest, command], { allowFail: true, input, timeoutMs: 60_000 });

describe('authorized-keys (as sshd runs it)', () => {
  it('prints each registry key forced to `buildbox session USER`, cert-authority and sk- keys included', async () => {
    const r = await run(join(sshdDir, 'buildbox'), ['authorized-keys', '--config', join(tb.dir, 'box.toml'), 'alice']);
    const lines = r.stdout.trim().split('\n');
    expect(lines).toHaveLength(2);
    const sock = join(tb.box.config.stateDir, 'session.sock');
    const command = `restrict,command="${process.execPath} ${cli} session --socket ${sock} alice"`;
    expect(lines[0]).toBe(
      `${command} ${tb.users.alice!.publicKey.split(' ').slice(0, 2).join(' ')} buildbox:${lines[0]!.split('buildbox:')[1]}`,
    );
    expect(lines[1]).toMatch(
      new RegExp(
        `^${command.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')},cert-authority,principals="alice" ssh-ed25519 AAAA`,
      ),
    );
    const bob = await run(join(sshdDir, 'buildbox'), ['authorized-keys', '--config', join(tb.dir, 'box.toml'), 'bob']);
    expect(bob.stdout).toMatch(/^restrict,command="[^"]+ session --socket \S+ bob" sk-ssh-ed25519@openssh\.com AAAA/m);
    for (const who of ['dave', 'nobody-at-all', '../etc']) {
      const none = await run(join(sshdDir, 'buildbox'), ['authorized-keys', '--config', join(tb.dir, 'box.toml'), who]);
      expect(none).toMatchObject({ code: 0, stdout: '' });
    }
  });

  it('sshd accepts registry users only', async () => {
    const ok = await ssh(clientCfg, 'alice@obox', 'buildbox-info');
    expect(ok.code, ok.stderr).toBe(0);
    expect(JSON.parse(ok.stdout)).toMatchObject({ 'buildbox-info': 1, user: 'alice', systems: [SYSTEM] });
    // dave has a unix account and a key, but no registry entry.
    const dave = await ssh(clientCfg, 'dave@obox', 'nix-store --serve --write');
    expect(dave.code).toBe(255);
    expect(dave.stderr).toMatch(/Permission denied \(publickey\)/);
    // Only the forced command runs, whatever the client asks for.
    const shell = await ssh(clientCfg, 'alice@obox', 'id; cat /etc/passwd');
    expect(shell.code).toBe(1);
    expect(shell.stdout).toBe('');
    expect(shell.stderr).toMatch(/buildbox only speaks the Nix remote-store protocols/);
  });
});

describe.each(CLIENTS)('Nix $name through OpenSSH', (client) => {
  it('copies a path to the box (ssh:// and ssh-ng://) into the user view', async () => {
    for (const proto of ['ssh', 'ssh-ng']) {
      const file = join(tb.dir, `payload-${client.name}-${proto}-${nonce()}`);
      writeFileSync(file, `payload ${file}\n`);
      const add = await tb.nix(client.run, 'nix-store', ['--add', file]);
      const path = add.stdout.trim();
      const r = await tb.nix(client.run, 'nix', ['copy', '--to', `${proto}://alice@obox`, path], {
        allowFail: true,
        env: { NIX_SSHOPTS: `-F ${clientCfg}` },
      });
      if (r.code !== 0) throw new Error(`nix copy over ${proto} failed:\n${r.stderr}`);
      expect(tb.box.store.isValidPath('alice', path)).toBe(true);
      expect(tb.box.store.isValidPath('bob', path)).toBe(false);
    }
  });

  it('builds on the box (ssh-ng:// builder)', async () => {
    const greeting = `openssh-${client.name}-${nonce()}`;
    const r = await tb.nix(
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
        '--builders',
        `ssh-ng://bob@obox ${SYSTEM}`,
        '--option',
        'builders-use-substitutes',
        'false',
      ],
      { allowFail: true, env: { NIX_SSHOPTS: `-F ${clientCfg}` } },
    );
    if (r.code !== 0) throw new Error(`build failed:\n${r.stderr}`);
    const out = r.stdout.trim();
    expect(out).toMatch(/^\/nix\/store\/[0-9a-z]{32}-hello-box$/);
    expect(tb.box.store.queryPathInfo('bob', out)).toBeDefined();
    const dump = await tb.nix(client.run, 'nix-store', ['--dump', out]);
    expect(dump.stdout).toContain(greeting);
  });
});

describe('certificates and the rest', () => {
  it('accepts a user certificate signed by the registry cert-authority key (Nix 2.8 builds with it)', async () => {
    const greeting = `cert-${nonce()}`;
    const r = await tb.nix(
      nix28,
      'nix-build',
      [
        tb.helloBox(),
        '--argstr',
        'greeting',
        greeting,
        '--no-out-link',
        '--max-jobs',
        '0',
        '--builders',
        `ssh://alice@cbox ${SYSTEM}`,
      ],
      { allowFail: true, env: { NIX_SSHOPTS: `-F ${certCfg}` } },
    );
    if (r.code !== 0) throw new Error(`build with a certificate failed:\n${r.stderr}`);
    expect(tb.box.store.queryPathInfo('alice', r.stdout.trim())).toBeDefined();
    // The same key without its certificate is nobody's; a certificate is only good for its principal; a key that is
    // in no registry gets nowhere. (Each with a config offering exactly that one identity.)
    const only = (identity: string, user: string, cert?: string) => {
      const cfg = join(tb.dir, `only-${nonce()}`);
      const common = readFileSync(certCfg, 'utf8')
        .split('\n')
        .filter((l) =>
          /^ {2}(HostName|Port|UserKnownHostsFile|StrictHostKeyChecking|IdentitiesOnly|BatchMode|LogLevel) /.test(l),
        );
      writeFileSync(
        cfg,
        `Host zbox\n  User ${user}\n  IdentityFile ${identity}\n${cert ? `  CertificateFile ${cert}\n` : ''}${common.join('\n')}\n`,
      );
      return run('ssh', ['-F', cfg, 'zbox', 'buildbox-info'], { allowFail: true });
    };
    const bareKey = join(tb.dir, 'id_cert_bare');
    copyFileSync(certKey, bareKey);
    chmodSync(bareKey, 0o600);
    expect((await only(certKey, 'alice', `${certKey}-cert.pub`)).code).toBe(0);
    expect((await only(bareKey, 'alice')).code).toBe(255);
    expect((await only(certKey, 'bob', `${certKey}-cert.pub`)).code).toBe(255);
    expect((await only(strayKey, 'alice')).code).toBe(255);
  });

  it('doctor passes every check through the OpenSSH front door', async () => {
    const kh = join(tb.dir, 'openssh_known_hosts');
    const r = await run(
      process.execPath,
      [
        cli,
        'doctor',
        `ssh-ng://alice@127.0.0.1:${port}`,
        '--key',
        tb.users.alice!.key,
        '--known-hosts',
        kh,
        '--ssh-config',
        '/dev/null',
        '--builders',
        '',
      ],
      { allowFail: true },
    );
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/✓ round trip of a store path/);
    expect(r.stdout).not.toMatch(/✗/);
  });

  it('streams a large upload through sshd, the forced command and the socket', async () => {
    const dir = join(tb.dir, `big-${nonce()}`);
    await run('mkdir', ['-p', dir]);
    writeFileSync(join(dir, 'blob'), randomBytes(48 * 1024 * 1024));
    const add = await tb.nix(nix28, 'nix-store', ['--add', dir]);
    const path = add.stdout.trim();
    const r = await tb.nix(nix28, 'nix', ['copy', '--to', 'ssh-ng://alice@obox', path], {
      allowFail: true,
      env: { NIX_SSHOPTS: `-F ${clientCfg}` },
    });
    if (r.code !== 0) throw new Error(`big copy failed:\n${r.stderr}`);
    const info = tb.box.store.queryPathInfo('alice', path);
    expect(info?.narSize).toBeGreaterThan(48 * 1024 * 1024);
    const local = await tb.nix(nix28, 'nix', ['path-info', '--json', path]);
    const localInfo = JSON.parse(local.stdout)[0] as { narHash: string };
    expect(info!.narHash.toSRI()).toBe(localInfo.narHash);
  });

  it('says in one line that the box is not running when its socket is gone', async () => {
    await tb.box.sessions.close();
    expect(existsSync(join(tb.box.config.stateDir, 'session.sock'))).toBe(false);
    const r = await ssh(clientCfg, 'alice@obox', 'nix-store --serve --write');
    expect(r.code).toBe(255);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^buildbox: the build box is not running \(nothing listens on .*session\.sock\)/);
    expect(statSync(tb.box.config.stateDir).isDirectory()).toBe(true);
  });
});
