import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { knownHostsLine, loadOrCreateHostKey } from '../src/host-key.js';
import { run, tempDir } from './helpers/exec.js';

describe('host key', () => {
  it('is generated once, reused, and its fingerprint matches ssh-keygen', async () => {
    const t = tempDir();
    try {
      const a = loadOrCreateHostKey(t.path);
      const b = loadOrCreateHostKey(t.path);
      expect(b.fingerprint).toBe(a.fingerprint);
      expect(b.publicKey).toBe(a.publicKey);
      expect(statSync(a.path).mode & 0o777).toBe(0o600);
      const { stdout } = await run('ssh-keygen', ['-l', '-f', join(t.path, 'ssh_host_ed25519_key.pub')]);
      expect(stdout.split(' ')[1]).toBe(a.fingerprint);
      // The private key is a valid OpenSSH key whose public half is ours.
      const pub = await run('ssh-keygen', ['-y', '-f', a.path]);
      expect(pub.stdout.trim().split(' ').slice(0, 2).join(' ')).toBe(a.publicKey);
      expect(readFileSync(`${a.path}.pub`, 'utf8')).toContain(a.publicKey);
      expect(knownHostsLine(a, '127.0.0.1', 2222)).toBe(`[127.0.0.1]:2222 ${a.publicKey}`);
      expect(knownHostsLine(a, 'box.example.org', 22)).toBe(`box.example.org ${a.publicKey}`);
    } finally {
      t.cleanup();
    }
  });
});
