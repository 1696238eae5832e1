/**
 * The built `buildbox` binary as users run it (plain Node ESM, not the test transpiler): serve with a config file,
 * fingerprint, clear errors for bad input.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeUserKey } from './helpers/box.js';
import { compiledCli } from './helpers/cli.js';
import { run, tempDir } from './helpers/exec.js';
import { nix28 } from './helpers/nix.js';

let CLI = '';
const t = tempDir('buildbox-cli-');
let child: ChildProcess | undefined;

beforeAll(async () => {
  chmodSync(t.path, 0o755);
  CLI = await compiledCli();
});
afterAll(() => {
  child?.kill('SIGKILL');
  t.cleanup();
});

describe('buildbox CLI', () => {
  it('prints its version and help', async () => {
    const v = await run('node', [CLI, '--version']);
    expect(v.stdout.trim()).toMatch(/^\d+\.\d+\.\d+$/);
    const h = await run('node', [CLI, '--help']);
    for (const cmd of ['serve', 'fingerprint', 'users']) expect(h.stdout).toContain(cmd);
  });

  it('serves with a config file, prints the fingerprint, and answers a real Nix client', async () => {
    const dir = t.path;
    mkdirSync(join(dir, 'reg', 'keys'), { recursive: true });
    const alice = await makeUserKey(dir, 'alice');
    writeFileSync(join(dir, 'reg', 'keys', 'alice'), `${alice.publicKey}\n`);
    writeFileSync(join(dir, 'reg', 'users.nix'), '{ alice = { keys = ./keys/alice; }; }\n');
    writeFileSync(
      join(dir, 'box.toml'),
      'port = 0\nstate-dir = "state"\n[registry]\npath = "reg"\n[status]\nport = 0\n',
    );
    // As an installed `buildbox` runs: the file itself, through its interpreter line (and its V8 memory flag).
    chmodSync(CLI, 0o755);
    child = spawn(CLI, ['serve', '--config', join(dir, 'box.toml')], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    const port = await new Promise<number>((resolve, reject) => {
      child!.stderr!.on('data', (d: Buffer) => {
        err += d.toString();
        const m = /listening on [\d.]+:(\d+)/.exec(err);
        if (m && err.includes('signing public key')) resolve(Number(m[1]));
      });
      child!.on('exit', (c) => reject(new Error(`serve exited ${c}: ${err}`)));
    });
    const fp = await run('node', [
      CLI,
      'fingerprint',
      '--json',
      '--config',
      join(dir, 'box.toml'),
      '--port',
      String(port),
    ]);
    const j = JSON.parse(fp.stdout) as { fingerprint: string; knownHosts: string; signingKey: string };
    expect(err).toContain(`host key fingerprint: ${j.fingerprint}`);
    expect(readFileSync(`/proc/${child.pid}/cmdline`, 'utf8').split('\0')).toContain('--max-semi-space-size=4');
    expect(j.signingKey).toMatch(/^buildbox-.+-1:/);
    writeFileSync(join(dir, 'known_hosts'), `${j.knownHosts}\n`);
    expect(readFileSync(join(dir, 'state', 'ssh_host_ed25519_key.pub'), 'utf8')).toContain(j.knownHosts.split(' ')[2]);
    const ping = await nix28('nix', ['store', 'ping', '--store', 'ssh://alice@127.0.0.1'], {
      env: {
        NIX_SSHOPTS: `-p ${port} -i ${alice.key} -o IdentitiesOnly=yes -o UserKnownHostsFile=${dir}/known_hosts -o StrictHostKeyChecking=yes`,
      },
    });
    expect(ping.code).toBe(0);
    child.kill('SIGTERM');
    await new Promise((r) => child!.on('exit', r));
  });

  it('rejects a config file with an unknown key, pointing at its line', async () => {
    writeFileSync(join(t.path, 'bad.toml'), 'port = 0\nmax-jbos = 4\n');
    const r = await run('node', [CLI, 'serve', '--config', join(t.path, 'bad.toml')], { allowFail: true });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`${join(t.path, 'bad.toml')}:2: unknown key 'max-jbos'`);
    expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
  });

  it('refuses to serve with build uids that belong to an account or a running process', async () => {
    // uid 1 is 'daemon' on Debian: slots 1…4 would run builds (and kill processes) as it.
    writeFileSync(
      join(t.path, 'uids.toml'),
      `port = 0\nstate-dir = "${t.path}/uids"\nbuild-uid-base = 1\nmax-jobs = 4\n`,
    );
    const r = await run('node', [CLI, 'serve', '--config', join(t.path, 'uids.toml')], { allowFail: true });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(
      "the build uids 1–4 (build-uid-base, max-jobs) must be reserved for this box, but uid 1 is the account 'daemon' in /etc/passwd",
    );
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(existsSync(join(t.path, 'uids'))).toBe(false); // refused before anything was made
  });
});
