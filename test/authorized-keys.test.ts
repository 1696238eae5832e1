import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import {
  algoMatchesKeyType,
  checkKeyBlob,
  parseAuthorizedKeyLine,
  parseAuthorizedKeys,
  sshFingerprint,
} from '../src/authorized-keys.js';
import { keygenFingerprint, makeKeys, type TestKeys, wireBlob } from './helpers/registry-fixtures.js';

let K: TestKeys;
beforeAll(async () => {
  K = await makeKeys(2);
});
afterAll(() => K?.cleanup());

function one(line: string) {
  const r = parseAuthorizedKeys(`${line}\n`);
  return r;
}

describe('key types, sizes and fingerprints against ssh-keygen', () => {
  test('ed25519, ecdsa 256/384/521, rsa 3072 are usable and fingerprint exactly like ssh-keygen -l', async () => {
    const cases: Array<[string, string, number]> = [
      [K.ed[0]!.pub, 'ssh-ed25519', 256],
      [K.ecdsa256.pub, 'ecdsa-sha2-nistp256', 256],
      [K.ecdsa384.pub, 'ecdsa-sha2-nistp384', 384],
      [K.ecdsa521.pub, 'ecdsa-sha2-nistp521', 521],
      [K.rsa3072.pub, 'ssh-rsa', 3072],
    ];
    for (const [pub, type, bits] of cases) {
      const r = one(pub);
      expect(r.problems).toEqual([]);
      const k = r.keys[0]!;
      expect(k.type).toBe(type);
      expect(k.bits).toBe(bits);
      expect(k.usable).toBe(true);
      expect(k.fingerprint).toBe(await keygenFingerprint(pub, K.dir));
      expect(k.blob.toString('base64')).toBe(pub.split(' ')[1]);
      expect(k.comment).toBe(pub.split(' ')[2]);
    }
  });

  test('RSA 1024 is refused as too weak', () => {
    const r = one(K.rsa1024.pub);
    expect(r.keys).toEqual([]);
    expect(r.problems).toEqual([
      {
        line: 1,
        col: 1,
        severity: 'error',
        kind: 'weak',
        message:
          'RSA key of 1024 bits is too weak: at least 2048 bits are required (make a new key: ssh-keygen -t ed25519)',
      },
    ]);
  });

  test('DSA is refused', () => {
    const r = one(K.dsa.pub);
    expect(r.keys).toEqual([]);
    expect(r.problems.map((p) => [p.kind, p.message])).toEqual([
      [
        'weak',
        'DSA (ssh-dss) keys are refused: they are weak and OpenSSH no longer accepts them (make a new key: ssh-keygen -t ed25519)',
      ],
    ]);
  });

  test('security keys are parsed and flagged for the OpenSSH front door; fingerprints match ssh-keygen', async () => {
    for (const line of [K.skEd, K.skEcdsa]) {
      const r = one(line);
      expect(r.problems).toEqual([]);
      const k = r.keys[0]!;
      expect(k.usable).toBe(false);
      expect(k.unusableReason).toBe(
        `security-key (FIDO) key \`${line.split(' ')[0]}\`: not usable by the built-in server; use the OpenSSH front door`,
      );
      expect(k.fingerprint).toBe(await keygenFingerprint(line, K.dir));
    }
  });

  test('fingerprint is unpadded base64 of sha256(blob)', () => {
    expect(sshFingerprint(Buffer.from('abc'))).toBe('SHA256:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0');
  });

  test('RSA offered as rsa-sha2-256/512 matches an ssh-rsa key', () => {
    expect(algoMatchesKeyType('rsa-sha2-512', 'ssh-rsa')).toBe(true);
    expect(algoMatchesKeyType('ssh-rsa', 'ssh-rsa')).toBe(true);
    expect(algoMatchesKeyType('rsa-sha2-256', 'ssh-ed25519')).toBe(false);
    expect(algoMatchesKeyType('ssh-ed25519', 'ssh-ed25519')).toBe(true);
  });
});

describe('options', () => {
  test('restrict, from= and command= with quoted commas and escaped quotes are kept', () => {
    const [type, b64] = K.ed[0]!.pub.split(' ');
    const line = `restrict,from="10.0.0.0/8,192.168.1.*",command="echo \\"a, b\\"",no-pty ${type} ${b64} me@laptop`;
    const r = one(line);
    expect(r.problems).toEqual([]);
    const k = r.keys[0]!;
    expect(k.options).toEqual([
      { name: 'restrict' },
      { name: 'from', value: '10.0.0.0/8,192.168.1.*' },
      { name: 'command', value: 'echo "a, b"' },
      { name: 'no-pty' },
    ]);
    expect(k.col).toBe(line.indexOf('ssh-ed25519') + 1);
    expect(k.comment).toBe('me@laptop');
    // The built-in server cannot enforce from= — the key goes to the OpenSSH front door.
    expect(k.usable).toBe(false);
    expect(k.unusableReason).toBe(
      'key restricted with `from=`: not usable by the built-in server; use the OpenSSH front door',
    );
  });

  test('restrict alone keeps the key usable', () => {
    const r = one(`restrict,no-port-forwarding ${K.ed[0]!.pub}`);
    expect(r.keys[0]!.usable).toBe(true);
  });

  test('cert-authority lines are parsed and flagged', () => {
    const r = one(`cert-authority,principals="alice" ${K.ed[1]!.pub}`);
    expect(r.problems).toEqual([]);
    const k = r.keys[0]!;
    expect(k.certAuthority).toBe(true);
    expect(k.usable).toBe(false);
    expect(k.unusableReason).toBe('cert-authority key: not usable by the built-in server; use the OpenSSH front door');
  });

  test('expiry-time is parsed; an expired key is a warning and keeps its expiry', () => {
    const r = parseAuthorizedKeys(`expiry-time="20200101" ${K.ed[0]!.pub}\n`, new Date('2024-01-01T00:00:00Z'));
    expect(r.problems.map((p) => [p.severity, p.kind])).toEqual([['warning', 'expired']]);
    expect(r.keys[0]!.expiresAt!.getFullYear()).toBe(2020);
    const utc = parseAuthorizedKeys(`expiry-time="203001021530Z" ${K.ed[0]!.pub}\n`);
    expect(utc.keys[0]!.expiresAt!.toISOString()).toBe('2030-01-02T15:30:00.000Z');
  });

  const bad: Array<[string, (k: TestKeys) => string, string, number]> = [
    ['unknown option', (k) => `no-such-thing ${k.ed[0]!.pub}`, 'unknown option `no-such-thing`', 1],
    ['flag with a value', (k) => `restrict="x" ${k.ed[0]!.pub}`, 'option `restrict` takes no value', 1],
    ['value option without one', (k) => `from ${k.ed[0]!.pub}`, 'option `from` needs a value: from="…"', 1],
    ['unquoted value', (k) => `from=10.0.0.1 ${k.ed[0]!.pub}`, 'option `from` needs a quoted value: from="…"', 1],
    ['unterminated quote', (k) => `command="ls ${k.ed[0]!.pub}`, 'unterminated quoted value of option `command`', 1],
    ['space inside options', (k) => `restrict, no-pty ${k.ed[0]!.pub}`, 'bad option syntax', 10],
    ['options and no key', () => 'restrict,no-pty', 'options are not followed by a key', 1],
  ];
  test.each(bad)('%s', (_n, mk, message, col) => {
    const r = one(mk(K));
    expect(r.keys).toEqual([]);
    expect(r.problems.map((p) => [p.col, p.message])).toEqual([[col, message]]);
  });
});

describe('malformed lines', () => {
  test('each mistake is reported with its line and column; comments and blank lines are ignored', () => {
    const [type, b64] = K.ed[0]!.pub.split(' ');
    const rsaB64 = K.rsa3072.pub.split(' ')[1]!;
    const text = [
      '# a comment',
      '',
      '   ',
      `${type}`,
      `${type} not*base64 x`,
      `${type} ${b64!.slice(0, -4)} truncated`,
      `ssh-ed25519 ${rsaB64} mismatch`,
      `ssh-foo ${b64} unknown`,
      `ssh-ed25519-cert-v01@openssh.com ${b64} cert`,
      `hello`,
      `  ${K.ed[1]!.pub}`,
    ].join('\n');
    const r = parseAuthorizedKeys(text);
    expect(r.problems.map((p) => `${p.line}:${p.col}: ${p.message}`)).toEqual([
      '4:1: `ssh-ed25519` is not followed by key data',
      '5:13: key data is not valid base64',
      '6:13: key data is truncated or malformed (ssh-ed25519)',
      '7:13: key data is `ssh-rsa`, but the line says `ssh-ed25519`',
      '8:1: unknown key type `ssh-foo` (expected ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa)',
      '9:1: a certificate (`ssh-ed25519-cert-v01@openssh.com`) does not belong in authorized_keys; to trust a CA, add its public key with `cert-authority`',
      '10:1: unknown key type `hello` (expected ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa)',
    ]);
    expect(r.keys.map((k) => [k.line, k.col])).toEqual([[11, 3]]);
  });

  test('blob checks: trailing bytes, bad points, wrong curve', () => {
    expect(checkKeyBlob('ssh-ed25519', wireBlob('ssh-ed25519', Buffer.alloc(32), 'x'))).toEqual({
      ok: false,
      message: 'key data has trailing bytes (ssh-ed25519)',
    });
    expect(checkKeyBlob('ssh-ed25519', wireBlob('ssh-ed25519', Buffer.alloc(31)))).toMatchObject({ ok: false });
    expect(
      checkKeyBlob('ecdsa-sha2-nistp256', wireBlob('ecdsa-sha2-nistp256', 'nistp384', Buffer.alloc(65, 4))),
    ).toMatchObject({ ok: false });
    expect(
      checkKeyBlob('ecdsa-sha2-nistp256', wireBlob('ecdsa-sha2-nistp256', 'nistp256', Buffer.alloc(65, 4))),
    ).toEqual({ ok: true, bits: 256 });
    expect(checkKeyBlob('ssh-ed25519', Buffer.from([0, 0, 0]))).toMatchObject({ ok: false });
  });

  test('a duplicate line in one file is a warning, kept once', () => {
    const r = parseAuthorizedKeys(`${K.ed[0]!.pub}\n${K.ed[0]!.pub} again\n`);
    expect(r.keys.length).toBe(1);
    expect(r.problems.map((p) => [p.line, p.severity, p.kind])).toEqual([[2, 'warning', 'duplicate']]);
  });

  test('CRLF line endings and a missing final newline are fine', () => {
    const r = parseAuthorizedKeys(`${K.ed[0]!.pub}\r\n${K.ecdsa256.pub}`);
    expect(r.problems).toEqual([]);
    expect(r.keys.map((k) => k.comment)).toEqual(['user0@host', 'ec256@host']);
  });

  test('parseAuthorizedKeyLine ignores comments', () => {
    expect(parseAuthorizedKeyLine('# x')).toBeUndefined();
    expect(parseAuthorizedKeyLine('   ')).toBeUndefined();
  });
});

describe('private keys pasted by mistake are reported loudly', () => {
  test('OpenSSH, PEM RSA, PKCS#8, EC, PuTTY, and a bare OpenSSH private body', () => {
    const putty = [
      'PuTTY-User-Key-File-3: ssh-ed25519',
      'Encryption: none',
      'Comment: x',
      'Public-Lines: 2',
      'AAAAC3NzaC1lZDI1NTE5AAAAIA',
      'Private-Lines: 1',
      'AAAAIA',
      'Private-MAC: 00',
    ].join('\n');
    const privBody = K.ed[0]!.priv.split('\n')[1]!;
    const text = [
      K.ed[1]!.pub,
      K.ed[0]!.priv.trim(),
      K.rsaPem.trim(),
      '-----BEGIN PRIVATE KEY-----',
      'MC4CAQAwBQYDK2VwBCIEIA==',
      '-----END PRIVATE KEY-----',
      '-----BEGIN EC PRIVATE KEY-----',
      '-----END EC PRIVATE KEY-----',
      putty,
      `ssh-ed25519 ${privBody}`,
    ].join('\n');
    const r = parseAuthorizedKeys(text);
    expect(r.hasPrivateKey).toBe(true);
    expect(r.keys.map((k) => k.line)).toEqual([1]);
    const privLines = K.ed[0]!.priv.trim().split('\n').length;
    const pemLines = K.rsaPem.trim().split('\n').length;
    const at = 2 + privLines + pemLines;
    expect(r.problems.map((p) => [p.line, p.kind])).toEqual([
      [2, 'private-key'],
      [2 + privLines, 'private-key'],
      [at, 'private-key'],
      [at + 3, 'private-key'],
      [at + 5, 'private-key'],
      [at + 13, 'private-key'],
    ]);
    expect(r.problems[0]!.message).toBe(
      'PRIVATE KEY (-----BEGIN OPENSSH PRIVATE KEY-----): this is a secret key, and it is now public. Remove it (also from the git history), treat it as compromised, make a new key pair and add only the public key (the .pub file)',
    );
    expect(r.problems[1]!.message).toContain('(-----BEGIN RSA PRIVATE KEY-----)');
    expect(r.problems[4]!.message).toContain('(PuTTY key file, PuTTY-User-Key-File-3)');
    expect(r.problems[5]!.message).toContain('(OpenSSH private key data)');
  });

  test('RFC 4716 public keys get a conversion hint', () => {
    const r = parseAuthorizedKeys('---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n---- END SSH2 PUBLIC KEY ----\n');
    expect(r.problems.map((p) => p.message)).toEqual([
      'RFC 4716 (SSH2) public key format is not accepted: convert it with `ssh-keygen -i -f FILE`',
    ]);
  });
});
