import { join } from 'node:path';
import { Command } from 'commander';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { registerUsersCommands } from '../src/commands/users.js';
import { renderAttrName } from '../src/nix-data.js';
import { formatProblem } from '../src/registry.js';
import { checkRegistry, compareUserNames, githubAnnotation, runUsersCheck } from '../src/registry-check.js';
import { tempDir } from './helpers/exec.js';
import { nix28, REPO } from './helpers/nix.js';
import { makeKeys, type TestKeys, writeTree } from './helpers/registry-fixtures.js';

let K: TestKeys;
const dirs: Array<{ cleanup: () => void }> = [];
beforeAll(async () => {
  K = await makeKeys(8);
});
afterAll(() => {
  K?.cleanup();
  for (const d of dirs) d.cleanup();
});

function newDir(): string {
  const t = tempDir('buildbox-check-');
  dirs.push(t);
  return t.path;
}

type Form = 'attrs' | 'list';
interface UserSpec {
  name: string;
  /** Nix field lines, e.g. `trusted = true;` (default: keys = ./keys/NAME;). */
  fields?: string[];
}

/** users.nix in either form, one field per line. */
function usersNix(form: Form, users: UserSpec[]): string {
  const fieldsOf = (u: UserSpec) => u.fields ?? [`keys = ./keys/${u.name};`];
  if (form === 'attrs') {
    return `{\n${users
      .map(
        (u) =>
          `  ${renderAttrName(u.name)} = {\n${fieldsOf(u)
            .map((f) => `    ${f}\n`)
            .join('')}  };\n`,
      )
      .join('')}}\n`;
  }
  return `[\n${users
    .map(
      (u) =>
        `  {\n    name = ${JSON.stringify(u.name)};\n${fieldsOf(u)
          .map((f) => `    ${f}\n`)
          .join('')}  }\n`,
    )
    .join('')}]\n`;
}

/** line:col of the nth occurrence of needle (+ shift). */
function at(text: string, needle: string, nth = 0, shift = 0): string {
  let i = -1;
  for (let k = 0; k <= nth; k++) {
    i = text.indexOf(needle, i + 1);
    if (i < 0) throw new Error(`${needle} not in text`);
  }
  i += shift;
  const before = text.slice(0, i);
  const line = before.split('\n').length;
  const col = [...before.slice(before.lastIndexOf('\n') + 1)].length + 1;
  return `${line}:${col}`;
}

/** Where a user's name is: the attribute name, or the `name = "…"` string. */
function nameAt(form: Form, text: string, name: string, nth = 0): string {
  return form === 'attrs'
    ? at(text, `  ${renderAttrName(name)} = {`, nth, 2)
    : at(text, `name = ${JSON.stringify(name)}`, nth, 7);
}

async function check(dir: string, opts: { strict?: boolean; requireVouch?: boolean } = {}) {
  const r = await checkRegistry(dir, opts);
  return { exit: r.exitCode, lines: r.problems.map((p) => formatProblem(p, dir)), result: r };
}

const FORMS: Form[] = ['attrs', 'list'];

describe.each(FORMS)('hostile corpus, %s form', (form) => {
  test('a clean registry passes strict checking', async () => {
    const dir = newDir();
    writeTree(dir, {
      'users.nix': usersNix(form, [
        { name: 'alice', fields: ['trusted = true;', 'sudo = true;', 'keys = ./keys/alice;'] },
        { name: 'bob', fields: ['trusted = true;', 'keys = ./keys/bob;', 'vouchedBy = [ "alice" ];'] },
      ]),
      'keys/alice': `${K.ed[0]!.pub}\n`,
      'keys/bob': `${K.ed[1]!.pub}\n`,
    });
    expect(await check(dir, { strict: true, requireVouch: true })).toMatchObject({ exit: 0, lines: [] });
  });

  test('syntax outside the data subset', async () => {
    const dir = newDir();
    const text = usersNix(form, [
      { name: 'alice', fields: ['keys = import ./keys/alice;'] },
      // biome-ignore lint/suspicious/noTemplateCurlyInString: Nix interpolation, written literally
      { name: 'bob', fields: ['keys = ./keys/${"bob"};', 'jobs = 2 + 2;'] },
    ]);
    writeTree(dir, { 'users.nix': text, 'keys/alice': `${K.ed[0]!.pub}\n`, 'keys/bob': `${K.ed[1]!.pub}\n` });
    const r = await check(dir);
    expect(r.exit).toBe(1);
    // Every syntax error; no "unused key file" noise, since nobody can be said to use a file that users.nix
    // cannot tell about.
    expect(r.lines).toEqual([
      `users.nix:${at(text, 'import')}: \`import\` is not allowed (plain data only)`,
      `users.nix:${at(text, '${')}: string interpolation \`\${…}\` is not allowed (plain data only)`,
      `users.nix:${at(text, '+')}: operator \`+\` is not allowed (plain data only)`,
    ]);
  });

  test('a user without a key file, one whose file is missing, one with an empty file, one with only comments', async () => {
    const dir = newDir();
    const text = usersNix(form, [
      { name: 'alice', fields: ['trusted = true;'] },
      { name: 'bob' },
      { name: 'carol' },
      { name: 'dave' },
    ]);
    writeTree(dir, { 'users.nix': text, 'keys/carol': '', 'keys/dave': '# my key will come later\n\n' });
    const r = await check(dir);
    expect(r.exit).toBe(1);
    expect(r.lines).toEqual([
      'keys/carol:1:1: key file of user "carol" has no keys',
      'keys/dave:1:1: key file of user "dave" has no keys',
      `users.nix:${nameAt(form, text, 'alice')}: user "alice" has no key file (add keys = ./keys/alice;)`,
      `users.nix:${at(text, './keys/bob')}: key file keys/bob of user "bob" does not exist`,
    ]);
  });

  test('a key file nobody references (and a private key hiding in one)', async () => {
    const dir = newDir();
    const text = usersNix(form, [{ name: 'alice' }]);
    writeTree(dir, {
      'users.nix': text,
      'keys/alice': `${K.ed[0]!.pub}\n`,
      'keys/ghost': `${K.ed[1]!.pub}\n`,
      'keys/alice.priv': `${K.ed[0]!.priv}`,
      'keys/.gitkeep': '',
    });
    const r = await check(dir);
    expect(r.exit).toBe(1);
    expect(r.lines).toEqual([
      'keys/alice.priv:1:1: key file keys/alice.priv is not used by any user in users.nix',
      'keys/alice.priv:1:1: PRIVATE KEY (-----BEGIN OPENSSH PRIVATE KEY-----): this is a secret key, and it is now public. Remove it (also from the git history), treat it as compromised, make a new key pair and add only the public key (the .pub file)',
      'keys/ghost:1:1: key file keys/ghost is not used by any user in users.nix',
    ]);
  });

  test('invalid user names', async () => {
    const dir = newDir();
    const names = ['bad name', '-dash', '1234', 'a'.repeat(33), 'x@y'];
    const text = usersNix(
      form,
      names.map((n, i) => ({ name: n, fields: [`keys = ./keys/u${i};`] })),
    );
    const files: Record<string, string> = { 'users.nix': text };
    names.forEach((_n, i) => {
      files[`keys/u${i}`] = `${K.ed[i]!.pub}\n`;
    });
    writeTree(dir, files);
    const r = await check(dir);
    expect(r.exit).toBe(1);
    const expected = [
      `users.nix:${nameAt(form, text, '1234')}: invalid user name "1234": it must not be all digits (that reads as a uid)`,
      `users.nix:${nameAt(form, text, 'a'.repeat(33))}: invalid user name "${'a'.repeat(33)}": longer than 32 characters`,
      `users.nix:${nameAt(form, text, 'bad name')}: invalid user name "bad name": a unix login name uses only A-Z a-z 0-9 . _ -`,
      `users.nix:${nameAt(form, text, '-dash')}: invalid user name "-dash": it must not start with '-'`,
      `users.nix:${nameAt(form, text, 'x@y')}: invalid user name "x@y": a unix login name uses only A-Z a-z 0-9 . _ -`,
    ];
    // Sorted by position; the out-of-order warnings are there too.
    expect(r.lines.filter((l) => !l.includes('warning:'))).toEqual(
      expected.sort((a, b) => Number(a.split(':')[1]) - Number(b.split(':')[1])),
    );
  });

  test('key lines that do not parse, RSA under 2048 bits, DSA', async () => {
    const dir = newDir();
    const text = usersNix(form, [{ name: 'alice' }]);
    const [type, b64] = K.ed[0]!.pub.split(' ');
    writeTree(dir, {
      'users.nix': text,
      'keys/alice': [
        K.ed[0]!.pub,
        `${type} ${b64!.slice(0, 20)}!!! broken`,
        'ssh-ed25519',
        K.rsa1024.pub,
        K.dsa.pub,
        `restrict,bogus ${K.ed[1]!.pub}`,
        '',
      ].join('\n'),
    });
    const r = await check(dir);
    expect(r.exit).toBe(1);
    expect(r.lines).toEqual([
      'keys/alice:2:13: key data is not valid base64',
      'keys/alice:3:1: `ssh-ed25519` is not followed by key data',
      'keys/alice:4:1: RSA key of 1024 bits is too weak: at least 2048 bits are required (make a new key: ssh-keygen -t ed25519)',
      'keys/alice:5:1: DSA (ssh-dss) keys are refused: they are weak and OpenSSH no longer accepts them (make a new key: ssh-keygen -t ed25519)',
      'keys/alice:6:10: unknown option `bogus`',
    ]);
    // The good key still counts.
    expect(r.result.analysis!.users.get('alice')!.keys.length).toBe(1);
  });

  test('the same public key under two users', async () => {
    const dir = newDir();
    const text = usersNix(form, [{ name: 'alice' }, { name: 'bob' }]);
    writeTree(dir, {
      'users.nix': text,
      'keys/alice': `${K.ed[0]!.pub}\n`,
      'keys/bob': `${K.ed[1]!.pub}\n${K.ed[0]!.pub.replace('user0@host', 'copied')}\n`,
    });
    const r = await check(dir);
    const fp = r.result.analysis!.users.get('alice')!.keys[0]!.fingerprint;
    expect(r.lines).toEqual([
      `keys/bob:2:1: this key (${fp}) is already used by user "alice" (keys/alice:1); a key belongs to one user`,
    ]);
    expect(r.exit).toBe(1);
  });

  test('two users pointing at the same key file', async () => {
    const dir = newDir();
    const text = usersNix(form, [{ name: 'alice' }, { name: 'bob', fields: ['keys = ./keys/alice;'] }]);
    writeTree(dir, { 'users.nix': text, 'keys/alice': `${K.ed[0]!.pub}\n` });
    const r = await check(dir);
    expect(r.lines).toEqual([
      `users.nix:${at(text, './keys/alice', 1)}: key file keys/alice is already used by user "alice"`,
    ]);
  });

  test('a private key pasted into a key file is refused loudly', async () => {
    const dir = newDir();
    const text = usersNix(form, [{ name: 'alice' }]);
    writeTree(dir, { 'users.nix': text, 'keys/alice': `${K.ed[0]!.pub}\n${K.rsaPem}` });
    const r = await check(dir);
    expect(r.exit).toBe(1);
    expect(r.lines).toEqual([
      'keys/alice:2:1: PRIVATE KEY (-----BEGIN RSA PRIVATE KEY-----): this is a secret key, and it is now public. Remove it (also from the git history), treat it as compromised, make a new key pair and add only the public key (the .pub file)',
    ]);
  });

  test('entries out of alphabetical order: a warning, an error with --strict', async () => {
    const dir = newDir();
    const text = usersNix(form, [{ name: 'alice' }, { name: 'carol' }, { name: 'bob' }, { name: 'Dave' }]);
    writeTree(dir, {
      'users.nix': text,
      'keys/alice': `${K.ed[0]!.pub}\n`,
      'keys/bob': `${K.ed[1]!.pub}\n`,
      'keys/carol': `${K.ed[2]!.pub}\n`,
      'keys/Dave': `${K.ed[3]!.pub}\n`,
    });
    const warn = `users.nix:${nameAt(form, text, 'bob')}: warning: user "bob" is out of alphabetical order: it belongs before "carol"`;
    expect(await check(dir)).toMatchObject({ exit: 0, lines: [warn] });
    expect(await check(dir, { strict: true })).toMatchObject({ exit: 1, lines: [warn.replace('warning: ', '')] });
  });

  test('duplicate users', async () => {
    const dir = newDir();
    // Different fields: Nix itself would silently merge the two attribute-set entries.
    const text = usersNix(form, [{ name: 'alice' }, { name: 'alice', fields: ['trusted = true;'] }]);
    writeTree(dir, { 'users.nix': text, 'keys/alice': `${K.ed[0]!.pub}\n` });
    const r = await check(dir);
    expect(r.exit).toBe(1);
    const first = nameAt(form, text, 'alice');
    const second = nameAt(form, text, 'alice', 1);
    expect(r.lines).toEqual([`users.nix:${second}: user "alice" is already defined at ${first}`]);

    // The same field twice is already a Nix error.
    const text2 = usersNix(form, [{ name: 'alice' }, { name: 'alice' }]);
    writeTree(dir, { 'users.nix': text2 });
    const r2 = await check(dir);
    expect(r2.lines).toEqual([
      form === 'attrs'
        ? `users.nix:${at(text2, 'keys =', 1)}: attribute \`alice.keys\` is already defined at ${at(text2, 'keys =')}`
        : `users.nix:${nameAt(form, text2, 'alice', 1)}: user "alice" is already defined at ${nameAt(form, text2, 'alice')}`,
    ]);
  });

  test('fields of the wrong type', async () => {
    const dir = newDir();
    const text = usersNix(form, [
      { name: 'alice', fields: ['trusted = "yes";', 'keys = ./keys/alice;'] },
      { name: 'bob', fields: ['keys = "./keys/bob";', 'jobs = 0;', 'vouchedBy = "alice";'] },
    ]);
    writeTree(dir, { 'users.nix': text, 'keys/alice': `${K.ed[0]!.pub}\n`, 'keys/bob': `${K.ed[1]!.pub}\n` });
    const r = await check(dir);
    expect(r.lines.filter((l) => l.startsWith('users.nix'))).toEqual([
      `users.nix:${at(text, '"yes"')}: \`trusted\` must be true or false`,
      `users.nix:${at(text, '"./keys/bob"')}: \`keys\` must be a path such as ./keys/bob`,
      `users.nix:${at(text, '0;')}: \`jobs\` must be a positive integer`,
      `users.nix:${at(text, '"alice";', form === 'attrs' ? 0 : 1)}: \`vouchedBy\` must be a list of user names: [ "bob" ]`,
    ]);
  });

  test('vouching: unknown voucher always; --require-vouch rules', async () => {
    const dir = newDir();
    const text = usersNix(form, [
      { name: 'admin', fields: ['sudo = true;', 'trusted = true;', 'keys = ./keys/admin;'] },
      { name: 'bob', fields: ['trusted = true;', 'keys = ./keys/bob;', 'vouchedBy = [ "admin" ];'] },
      { name: 'carol', fields: ['keys = ./keys/carol;', 'vouchedBy = [ "zed" ];'] },
      { name: 'dave', fields: ['keys = ./keys/dave;'] },
      { name: 'erin', fields: ['trusted = true;', 'keys = ./keys/erin;', 'vouchedBy = [ "frank" ];'] },
      { name: 'frank', fields: ['trusted = true;', 'keys = ./keys/frank;', 'vouchedBy = [ "erin" ];'] },
      { name: 'gina', fields: ['keys = ./keys/gina;', 'vouchedBy = [ "gina" "dave" ];'] },
      { name: 'hal', fields: ['keys = ./keys/hal;', 'vouchedBy = [ "bob" ];'] },
    ]);
    const keys: Record<string, string> = {};
    ['admin', 'bob', 'carol', 'dave', 'erin', 'frank', 'gina', 'hal'].forEach((n, i) => {
      keys[`keys/${n}`] = `${i < 8 ? K.ed[i]!.pub : ''}\n`;
    });
    writeTree(dir, { 'users.nix': text, ...keys });
    const plain = await check(dir);
    expect(plain).toMatchObject({
      exit: 1,
      lines: [`users.nix:${at(text, '"zed"')}: unknown voucher "zed": there is no such user`],
    });
    const strict = await check(dir, { requireVouch: true });
    expect(strict.exit).toBe(1);
    const byLine = (a: string, b: string) => {
      const [, la, ca] = a.split(':').map(Number);
      const [, lb, cb] = b.split(':').map(Number);
      return la! - lb! || ca! - cb!;
    };
    expect(strict.lines).toEqual(
      [
        `users.nix:${nameAt(form, text, 'carol')}: user "carol" has no valid voucher (a trusted user other than themselves)`,
        `users.nix:${at(text, '"zed"')}: unknown voucher "zed": there is no such user`,
        `users.nix:${nameAt(form, text, 'dave')}: user "dave" needs a voucher: add vouchedBy = [ "<a trusted user>" ]; (or sudo = true for an admin)`,
        `users.nix:${nameAt(form, text, 'erin')}: user "erin" is vouched for only by users whose own vouching does not lead back to an admin (sudo = true)`,
        `users.nix:${nameAt(form, text, 'frank')}: user "frank" is vouched for only by users whose own vouching does not lead back to an admin (sudo = true)`,
        `users.nix:${nameAt(form, text, 'gina')}: user "gina" has no valid voucher (a trusted user other than themselves)`,
        `users.nix:${at(text, '"gina" "dave"')}: user "gina" cannot vouch for themselves`,
        `users.nix:${at(text, '"dave" ]')}: voucher "dave" is not a trusted user (trusted = true)`,
      ].sort(byLine),
    );
  });
});

describe('real nix-community-style registries pass', () => {
  test('quoted names, comments, password fields, keys/ paths without ./, cert-authority and sk- lines, five keys per file', async () => {
    const dir = newDir();
    const text = `# 1. Generate an SSH key for your root account and add the public
#    key to a file matching your name in ./keys/
#
# 2. Copy / paste this in order, alphabetically:
#
#    youruser = {
#      trusted = true;
#      keys = ./keys/youruser;
#    };
{
  "0x4A6F" = {
    trusted = true;
    keys = ./keys/0x4A6F;
  };

  aszlig = {
    trusted = true;
    keys = keys/aszlig;
  };

  grahamc = {
    sudo = true;
    trusted = true;
    password = "$6$lAjIm6PyElKewH$WfO/3pGei09YstCXghkCx5bDUvxsou2h63HMMTHgA";
    keys = ./keys/grahamc;
  };

  /* maintainers of the box */
  Profpatsch = {
    trusted = true;
    keys = ./keys/Profpatsch;
  };

  qyliss = {
    trusted = true;
    keys = ./keys/qyliss;
  };
}
`;
    writeTree(dir, {
      'users.nix': text,
      'keys/0x4A6F': `${K.ed[0]!.pub}\n${K.skEd}\n`,
      'keys/aszlig': `cert-authority ${K.ed[1]!.pub}\n${K.ecdsa521.pub}\n`,
      'keys/grahamc': [K.ed[2]!.pub, K.ecdsa256.pub, K.ecdsa384.pub, K.rsa3072.pub, K.skEcdsa, ''].join('\n'),
      'keys/Profpatsch': `# laptop\n${K.ed[3]!.pub}\n\n# desktop\nrestrict ${K.ed[4]!.pub}\n`,
      'keys/qyliss': `${K.ed[5]!.pub}\n`,
    });
    const r = await checkRegistry(dir, { strict: true });
    expect(r.problems.map((p) => formatProblem(p, dir))).toEqual([]);
    expect(r.exitCode).toBe(0);
    expect([...r.analysis!.users.keys()]).toEqual(['0x4A6F', 'aszlig', 'grahamc', 'Profpatsch', 'qyliss']);
    expect(r.analysis!.users.get('grahamc')!.keys.length).toBe(4);
    expect(r.analysis!.users.get('grahamc')!.unusableKeys.length).toBe(1);
    expect(r.notes.map((n) => `${n.file.slice(r.analysis!.dir.length + 1)}:${n.line}: ${n.message}`)).toEqual([
      'keys/0x4A6F:2: user "0x4A6F": security-key (FIDO) key `sk-ssh-ed25519@openssh.com`: not usable by the built-in server; use the OpenSSH front door',
      'keys/aszlig:1: user "aszlig": cert-authority key: not usable by the built-in server; use the OpenSSH front door',
      'keys/grahamc:5: user "grahamc": security-key (FIDO) key `sk-ecdsa-sha2-nistp256@openssh.com`: not usable by the built-in server; use the OpenSSH front door',
    ]);
  });

  test('the shipped example registry passes --strict --require-vouch, and real Nix reads its users.nix', async () => {
    const dir = join(REPO, 'examples', 'registry');
    const r = await checkRegistry(dir, { strict: true, requireVouch: true });
    expect(r.problems.map((p) => formatProblem(p, dir))).toEqual([]);
    expect([...r.analysis!.users.keys()]).toEqual(['0x4A6F', 'ada', 'bob', 'carol']);
    expect(r.notes.map((n) => n.message)).toEqual([
      'user "carol": security-key (FIDO) key `sk-ssh-ed25519@openssh.com`: not usable by the built-in server; use the OpenSSH front door',
    ]);
    const nix = await nix28('nix-instantiate', [
      '--eval',
      '--strict',
      '--expr',
      `builtins.attrNames (import ${dir}/users.nix)`,
    ]);
    expect(nix.stdout.trim()).toBe('[ "0x4A6F" "ada" "bob" "carol" ]');
  });

  test('name order is case-insensitive like the community file', () => {
    const names = ['qyliss', 'Profpatsch', 'aszlig', '0x4A6F', 'nicoo'];
    expect(names.sort(compareUserNames)).toEqual(['0x4A6F', 'aszlig', 'nicoo', 'Profpatsch', 'qyliss']);
  });
});

describe('output and exit status', () => {
  async function runCheck(dir: string, env: NodeJS.ProcessEnv, extra: { strict?: boolean } = {}) {
    let out = '';
    let err = '';
    const code = await runUsersCheck(dir, {
      ...extra,
      env,
      base: dir,
      stdout: (s) => {
        out += s;
      },
      stderr: (s) => {
        err += s;
      },
    });
    return { code, out, err };
  }

  function brokenRegistry(): string {
    const dir = newDir();
    writeTree(dir, {
      'users.nix': '{\n  bob = { keys = ./keys/bob; };\n  alice = { keys = ./keys/alice; trusted = 1; };\n}\n',
      'keys/bob': `${K.ed[0]!.pub}\n${K.skEd}\n`,
      'keys/alice': `${K.ed[1]!.pub}\n`,
    });
    return dir;
  }

  test('plain: file:line:col lines on stdout, a summary on stderr, exit 1', async () => {
    const r = await runCheck(brokenRegistry(), {});
    expect(r.code).toBe(1);
    expect(r.out).toBe(
      [
        'users.nix:3:3: warning: user "alice" is out of alphabetical order: it belongs before "bob"',
        'users.nix:3:44: `trusted` must be true or false',
        'keys/bob:2:1: note: user "bob": security-key (FIDO) key `sk-ssh-ed25519@openssh.com`: not usable by the built-in server; use the OpenSSH front door',
        '',
      ].join('\n'),
    );
    expect(r.err).toBe('users check: 1 error, 1 warning (2 users)\n');
  });

  test('GitHub Actions: ::error / ::warning / ::notice annotations relative to the workspace', async () => {
    const dir = brokenRegistry();
    const r = await runCheck(dir, { GITHUB_ACTIONS: 'true', GITHUB_WORKSPACE: dir });
    expect(r.code).toBe(1);
    expect(r.out.split('\n')).toEqual([
      '::warning file=users.nix,line=3,col=3::user "alice" is out of alphabetical order: it belongs before "bob"',
      '::error file=users.nix,line=3,col=44::`trusted` must be true or false',
      '::notice file=keys/bob,line=2,col=1::user "bob": security-key (FIDO) key `sk-ssh-ed25519@openssh.com`: not usable by the built-in server; use the OpenSSH front door',
      '',
    ]);
  });

  test('annotation escaping', () => {
    expect(githubAnnotation('error', { file: '/r/a,b:c.nix', line: 1, col: 2, message: '100% bad\nnext' }, '/r')).toBe(
      '::error file=a%2Cb%3Ac.nix,line=1,col=2::100%25 bad%0Anext',
    );
  });

  test('clean: exit 0; unreadable: exit 2', async () => {
    const dir = newDir();
    writeTree(dir, { 'users.nix': '{ alice = { keys = ./keys/alice; }; }', 'keys/alice': `${K.ed[0]!.pub}\n` });
    expect(await runCheck(dir, {})).toEqual({ code: 0, out: '', err: 'users check: 1 user, no problems\n' });
    const missing = await runCheck(`${dir}/nope`, {});
    expect(missing.code).toBe(2);
    expect(missing.err).toMatch(/^users check: cannot read registry directory .*\/nope: ENOENT\n$/);
    const noFile = newDir();
    const r = await runCheck(noFile, {});
    expect(r.code).toBe(2);
    expect(r.err).toMatch(/^users check: cannot read .*users\.nix: ENOENT\n$/);
  });

  test('through the commander program: buildbox users check DIR --strict', async () => {
    const dir = newDir();
    writeTree(dir, {
      'users.nix': '{ bob = { keys = ./keys/bob; }; alice = { keys = ./keys/alice; }; }',
      'keys/bob': `${K.ed[0]!.pub}\n`,
      'keys/alice': `${K.ed[1]!.pub}\n`,
    });
    const run = async (args: string[]) => {
      let out = '';
      let err = '';
      const program = new Command().exitOverride();
      registerUsersCommands(program, {
        stdout: (s) => {
          out += s;
        },
        stderr: (s) => {
          err += s;
        },
        stdin: async () => Buffer.alloc(0),
        env: {},
      });
      const saved = process.exitCode;
      await program.parseAsync(['node', 'buildbox', ...args]);
      const code = process.exitCode;
      process.exitCode = saved;
      return { code, out, err };
    };
    const loose = await run(['users', 'check', dir]);
    expect(loose.code).toBe(0);
    expect(loose.out).toMatch(/warning: user "alice" is out of alphabetical order/);
    const strict = await run(['users', 'check', dir, '--strict']);
    expect(strict.code).toBe(1);
    expect(strict.err).toBe('users check: 1 error, 0 warnings (2 users)\n');
  });
});
