/**
 * Issue 8, `buildbox doctor`: against a live box every check passes (exit 0); each failure made on purpose gives its
 * ✗, the fix, and the exit status — a key with a passphrase, a wrong fingerprint (stops, loudly), a known_hosts
 * entry missing or wrong, an unknown user, the box down, a feature the box lacks.
 */
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DoctorReport } from '../src/doctor.js';
import { startTestBox, type TestBox } from './helpers/box.js';
import { compiledCli } from './helpers/cli.js';
import { run } from './helpers/exec.js';

let tb: TestBox;
let cli: string;
let knownHosts: string;
let target: string;

beforeAll(async () => {
  [tb, cli] = await Promise.all([
    startTestBox({
      users: ['alice', 'carol'],
      config: { supportedFeatures: ['benchmark', 'big-parallel'] },
      // carol is registered, but her key has a passphrase (added after the registry got her public key).
      prepare: async (_dir, users) => {
        await run('ssh-keygen', ['-q', '-p', '-P', '', '-N', 'correct horse', '-f', users.carol!.key]);
        return {};
      },
    }),
    compiledCli(),
  ]);
  knownHosts = join(tb.dir, 'doctor_known_hosts');
  writeFileSync(knownHosts, `[127.0.0.1]:${tb.port} ${tb.box.hostKey.publicKey}\n`);
  target = `127.0.0.1:${tb.port}`;
});
afterAll(async () => {
  await tb?.stop();
});

interface Outcome {
  code: number;
  out: string;
  lines: string[];
}

async function doctor(args: string[]): Promise<Outcome> {
  // Hermetic: no ssh config and, unless a test gives one, no builders line from this machine's Nix.
  const builders = args.includes('--builders') ? [] : ['--builders', ''];
  const r = await run(process.execPath, [cli, 'doctor', ...args, ...builders, '--ssh-config', '/dev/null'], {
    allowFail: true,
    timeoutMs: 120_000,
  });
  return { code: r.code, out: r.stdout, lines: r.stdout.split('\n') };
}

/** The ✓/✗ line of a check, and the fix line after it. */
function line(o: Outcome, title: string): { mark: string; text: string; fix?: string } {
  const i = o.lines.findIndex((l) => l.slice(2).startsWith(`${title}:`));
  if (i < 0) throw new Error(`no line for "${title}" in:\n${o.out}`);
  const l = o.lines[i]!;
  const next = o.lines[i + 1] ?? '';
  return {
    mark: l[0]!,
    text: l.slice(2 + title.length + 2),
    fix: next.startsWith('    fix: ') ? next.slice(9) : undefined,
  };
}

const ALL = [
  'key file',
  'key without passphrase',
  'box reachable',
  'host key fingerprint',
  'host key in known_hosts',
  'authentication',
  'nix-store --serve handshake (ssh://)',
  'nix-daemon --stdio handshake (ssh-ng://)',
  'systems',
  'features',
  'round trip of a store path',
];

describe('doctor against a live box', () => {
  it('passes every check and exits 0', async () => {
    const o = await doctor([
      `ssh-ng://alice@${target}`,
      '--key',
      tb.users.alice!.key,
      '--known-hosts',
      knownHosts,
      '--expect-fingerprint',
      tb.box.hostKey.fingerprint,
      '--builders',
      '',
    ]);
    expect(o.code, o.out).toBe(0);
    for (const t of ALL) expect(line(o, t).mark, `${t}\n${o.out}`).toBe('✓');
    expect(line(o, 'nix-store --serve handshake (ssh://)').text).toMatch(/protocol 2\.7$/);
    expect(line(o, 'nix-daemon --stdio handshake (ssh-ng://)').text).toMatch(/protocol 1\.38, .*trusted: no$/);
    expect(line(o, 'systems').text).toContain(tb.box.config.system);
    const rt = line(o, 'round trip of a store path').text;
    const path = /\/nix\/store\/[0-9a-z]{32}-buildbox-doctor-round-trip/.exec(rt)?.[0];
    expect(path).toBeDefined();
    // The tiny path really is on the box, in alice's view only.
    expect(tb.box.store.queryPathInfo('alice', path!)).toBeDefined();
    expect(tb.box.store.queryPathInfo('carol', path!)).toBeUndefined();
    expect(o.lines.at(-2)).toBe('all checks passed');
  });

  it('accepts the host key pinned by a machines line instead of known_hosts, and --json', async () => {
    const b64 = Buffer.from(tb.box.hostKey.publicKey).toString('base64');
    const o = await doctor([
      `alice@${target}`,
      '--key',
      tb.users.alice!.key,
      '--known-hosts',
      join(tb.dir, 'no-such-file'),
      '--builders',
      `ssh://alice@127.0.0.1 ${tb.box.config.system} ${tb.users.alice!.key} 2 1 big-parallel - ${b64}`,
      '--json',
    ]);
    expect(o.code, o.out).toBe(0);
    const report = JSON.parse(o.out) as DoctorReport;
    expect(report.ok).toBe(true);
    expect(report.exitCode).toBe(0);
    expect(report.checks.find((c) => c.id === 'known-hosts')).toMatchObject({
      status: 'pass',
      title: 'host key pinned',
    });
    expect(report.box?.fingerprint).toBe(tb.box.hostKey.fingerprint);
    expect(report.box?.systems).toEqual([tb.box.config.system]);
  });
});

describe('doctor on purpose-made failures', () => {
  it('a key with a passphrase', async () => {
    const o = await doctor([`carol@${target}`, '--key', tb.users.carol!.key, '--known-hosts', knownHosts]);
    expect(o.code).toBe(1);
    const p = line(o, 'key without passphrase');
    expect(p.mark).toBe('✗');
    expect(p.text).toMatch(/protected by a passphrase; the nix-daemon cannot type it/);
    expect(p.fix).toMatch(/ssh-keygen -t ed25519 -N ''/);
    expect(line(o, 'authentication').mark).toBe('✗');
    expect(line(o, 'round trip of a store path').mark).toBe('-');
  });

  it('a wrong fingerprint stops everything, loudly, with exit 3', async () => {
    const wrong = `SHA256:${createHash('sha256').update('not the box').digest('base64').replace(/=+$/, '')}`;
    const o = await doctor([
      `alice@${target}`,
      '--key',
      tb.users.alice!.key,
      '--known-hosts',
      knownHosts,
      '--expect-fingerprint',
      wrong,
    ]);
    expect(o.code).toBe(3);
    const f = line(o, 'host key fingerprint');
    expect(f.mark).toBe('✗');
    expect(f.text).toContain(
      `HOST KEY MISMATCH: 127.0.0.1:${tb.port} presents ${tb.box.hostKey.fingerprint} but you expected ${wrong}`,
    );
    expect(f.fix).toMatch(/^STOP: do not connect/);
    expect(o.out).toMatch(/!!! STOPPED/);
    expect(o.out).not.toMatch(/authentication:/);
  });

  it('a known_hosts entry that is missing (✗ with the line to add) or different (stop, exit 3)', async () => {
    const empty = join(tb.dir, 'empty_known_hosts');
    writeFileSync(empty, '');
    const missing = await doctor([`alice@${target}`, '--key', tb.users.alice!.key, '--known-hosts', empty]);
    expect(missing.code).toBe(1);
    const m = line(missing, 'host key in known_hosts');
    expect(m.mark).toBe('✗');
    const added = /echo '([^']+)'/.exec(m.fix ?? '')?.[1];
    expect(added).toBe(`[127.0.0.1]:${tb.port} ${tb.box.hostKey.publicKey}`);
    // Following the fix makes it pass.
    writeFileSync(empty, `${added}\n`);
    const fixed = await doctor([
      `alice@${target}`,
      '--key',
      tb.users.alice!.key,
      '--known-hosts',
      empty,
      '--builders',
      '',
    ]);
    expect(fixed.code, fixed.out).toBe(0);

    const other = join(tb.dir, 'other_key');
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', other]);
    const wrongKh = join(tb.dir, 'wrong_known_hosts');
    writeFileSync(
      wrongKh,
      `[127.0.0.1]:${tb.port} ${readFileSync(`${other}.pub`, 'utf8').split(' ').slice(0, 2).join(' ')}\n`,
    );
    const wrong = await doctor([`alice@${target}`, '--key', tb.users.alice!.key, '--known-hosts', wrongKh]);
    expect(wrong.code).toBe(3);
    expect(line(wrong, 'host key in known_hosts').text).toMatch(/^HOST KEY MISMATCH/);
    expect(line(wrong, 'host key in known_hosts').fix).toContain(`ssh-keygen -R '[127.0.0.1]:${tb.port}'`);
  });

  it('an unknown user', async () => {
    const o = await doctor([`mallory@${target}`, '--key', tb.users.alice!.key, '--known-hosts', knownHosts]);
    expect(o.code).toBe(1);
    const a = line(o, 'authentication');
    expect(a.mark).toBe('✗');
    expect(a.text).toMatch(/the box refused .* for user mallory .*Permission denied/);
    expect(a.fix).toMatch(/mallory is your name in the box's registry/);
    for (const t of ALL.slice(6)) expect(line(o, t).mark).toBe('-');
  });

  it('the box down', async () => {
    const s = createServer();
    await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
    const port = (s.address() as { port: number }).port;
    await new Promise<void>((r) => s.close(() => r()));
    const o = await doctor([`alice@127.0.0.1:${port}`, '--key', tb.users.alice!.key, '--known-hosts', knownHosts]);
    expect(o.code).toBe(1);
    const r = line(o, 'box reachable');
    expect(r.mark).toBe('✗');
    expect(r.text).toMatch(/connection refused .*is the box running/);
    expect(r.fix).toBeDefined();
    expect(line(o, 'authentication').mark).toBe('-');
  });

  it('a feature the box lacks: asked for, or claimed by the local builders line', async () => {
    const asked = await doctor([
      `alice@${target}`,
      '--key',
      tb.users.alice!.key,
      '--known-hosts',
      knownHosts,
      '--require-features',
      'kvm',
      '--builders',
      '',
    ]);
    expect(asked.code).toBe(1);
    const f = line(asked, 'features');
    expect(f.mark).toBe('✗');
    expect(f.text).toMatch(/^the box lacks kvm \(it offers benchmark, big-parallel\)/);
    expect(f.fix).toMatch(/supportedFeatures/);
    expect(line(asked, 'round trip of a store path').mark).toBe('✓');

    const machines = join(tb.dir, 'machines-with-kvm');
    writeFileSync(
      machines,
      `ssh-ng://alice@127.0.0.1 ${tb.box.config.system} ${tb.users.alice!.key} 2 1 kvm,benchmark\n`,
    );
    const claimed = await doctor([
      `alice@${target}`,
      '--key',
      tb.users.alice!.key,
      '--known-hosts',
      knownHosts,
      '--builders',
      `@${machines}`,
    ]);
    expect(claimed.code).toBe(1);
    expect(line(claimed, 'features').text).toMatch(/^the box lacks kvm/);
  });

  it('a key file readable by others, and one that does not exist', async () => {
    const loose = join(tb.dir, 'loose_key');
    copyFileSync(tb.users.alice!.key, loose);
    chmodSync(loose, 0o644);
    const o = await doctor([`alice@${target}`, '--key', loose, '--known-hosts', knownHosts]);
    expect(o.code).toBe(1);
    expect(line(o, 'key file')).toMatchObject({ mark: '✗', fix: `chmod 600 ${loose}` });
    const none = await doctor([`alice@${target}`, '--key', join(tb.dir, 'absent'), '--known-hosts', knownHosts]);
    expect(none.code).toBe(1);
    expect(line(none, 'key file').text).toMatch(/absent does not exist/);
  });
});
