import { chmodSync, existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Command } from 'commander';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { registerUsersCommands } from '../src/commands/users.js';
import { parseNixData } from '../src/nix-data.js';
import { formatProblem, loadRegistry } from '../src/registry.js';
import { checkRegistry, compareUserNames } from '../src/registry-check.js';
import { addUser, insertUserEntry, RegistryEditError, removeUser, removeUserEntry } from '../src/registry-edit.js';
import { tempDir } from './helpers/exec.js';
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
  const t = tempDir('buildbox-edit-');
  dirs.push(t);
  return t.path;
}

/** `after` is exactly `before` with `inserted` spliced in somewhere: every other byte is untouched. */
function expectInsertion(before: Buffer, after: Buffer, inserted: string): void {
  const ins = Buffer.from(inserted);
  expect(after.length).toBe(before.length + ins.length);
  for (let i = after.indexOf(ins); i >= 0; i = after.indexOf(ins, i + 1)) {
    if (Buffer.concat([after.subarray(0, i), after.subarray(i + ins.length)]).equals(before)) return;
  }
  expect.fail(`not a pure insertion of ${JSON.stringify(inserted)}:\n${after.toString('latin1')}`);
}

/** `after` is `before` with one contiguous run of bytes added, all else untouched. */
function isPureInsertion(before: string, after: string): boolean {
  let i = 0;
  while (i < before.length && before[i] === after[i]) i++;
  const rest = before.length - i;
  return after.length > before.length && after.slice(after.length - rest) === before.slice(i);
}

async function checkClean(dir: string) {
  const r = await checkRegistry(dir, { strict: true });
  expect(r.problems.map((p) => formatProblem(p, dir))).toEqual([]);
  expect(r.exitCode).toBe(0);
}

// A community-style file: header comment, blank lines between multi-line entries, a comment attached to an entry,
// odd spacing and a latin1 byte that is not UTF-8 — all must survive byte for byte.
const COMMUNITY = Buffer.concat([
  Buffer.from(`# 2. Copy / paste this in order, alphabetically:
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

  # aszlig's entry predates the ./ convention
  aszlig = {
    trusted   = true;
    keys = keys/aszlig;
  };

  grahamc = {
    sudo = true;
    trusted = true;
    keys = ./keys/grahamc; # `),
  Buffer.from([0xe9, 0xff]),
  Buffer.from(`
  };
}
`),
]);

function communityDir(): string {
  const dir = newDir();
  writeTree(dir, {
    'users.nix': COMMUNITY,
    'keys/0x4A6F': `${K.ed[0]!.pub}\n`,
    'keys/aszlig': `${K.ed[1]!.pub}\n`,
    'keys/grahamc': `${K.ed[2]!.pub}\n${K.skEd}\n`,
  });
  return dir;
}

describe('users add then users check: untouched bytes stay identical', () => {
  test('into a community-style attribute set: placed alphabetically, styled like its neighbours', async () => {
    const dir = communityDir();
    const r = await addUser(dir, 'bob', `${K.ed[3]!.pub}\n`, { trusted: true, vouchedBy: ['grahamc'] });
    const after = readFileSync(join(dir, 'users.nix'));
    expectInsertion(
      COMMUNITY,
      after,
      '  bob = {\n    trusted = true;\n    keys = ./keys/bob;\n    vouchedBy = [ "grahamc" ];\n  };\n\n',
    );
    // Between aszlig and grahamc.
    expect(after.toString('latin1').indexOf('  bob = {')).toBeGreaterThan(after.toString('latin1').indexOf('aszlig'));
    expect(after.toString('latin1').indexOf('  bob = {')).toBeLessThan(after.toString('latin1').indexOf('grahamc = {'));
    expect(readFileSync(join(dir, 'keys/bob'), 'utf8')).toBe(`${K.ed[3]!.pub}\n`);
    expect(r.keyFile).toBe(join(dir, 'keys/bob'));
    expect(r.fingerprints.length).toBe(1);
    await checkClean(dir);
    const reg = await loadRegistry(dir);
    expect(reg.users.get('bob')).toMatchObject({ trusted: true, vouchedBy: ['grahamc'] });

    // And removing it gives back the very same bytes, and no key file.
    const rm = await removeUser(dir, 'bob');
    expect(rm.keyFile).toBe(join(dir, 'keys/bob'));
    expect(readFileSync(join(dir, 'users.nix')).equals(COMMUNITY)).toBe(true);
    expect(existsSync(join(dir, 'keys/bob'))).toBe(false);
  });

  test('first, last, quoted and attached-comment positions', async () => {
    const dir = communityDir();
    await addUser(dir, '0x00', `${K.ed[3]!.pub}\n`);
    let now = readFileSync(join(dir, 'users.nix'));
    expectInsertion(COMMUNITY, now, '  "0x00" = {\n    keys = ./keys/0x00;\n  };\n\n');

    let prev = now;
    await addUser(dir, 'zoe', `${K.ed[4]!.pub}\n`);
    now = readFileSync(join(dir, 'users.nix'));
    expectInsertion(prev, now, '\n  zoe = {\n    keys = ./keys/zoe;\n  };\n');

    // "ada" goes before aszlig — above the comment attached to aszlig.
    prev = now;
    await addUser(dir, 'ada', `${K.ed[5]!.pub}\n`);
    now = readFileSync(join(dir, 'users.nix'));
    expectInsertion(prev, now, '  ada = {\n    keys = ./keys/ada;\n  };\n\n');
    const s = now.toString('latin1');
    expect(s.indexOf('ada = {')).toBeLessThan(s.indexOf("# aszlig's entry"));
    await checkClean(dir);

    for (const n of ['ada', 'zoe', '0x00']) await removeUser(dir, n);
    expect(readFileSync(join(dir, 'users.nix')).equals(COMMUNITY)).toBe(true);
  });

  test('list form with one-line entries and no blank lines', async () => {
    const dir = newDir();
    const before = Buffer.from(
      '# users\n[\n  { name = "alice"; trusted = true; keys = ./keys/alice; }\n  { name = "carol"; keys = ./keys/carol; } # hi\n]\n',
    );
    writeTree(dir, { 'users.nix': before, 'keys/alice': `${K.ed[0]!.pub}\n`, 'keys/carol': `${K.ed[1]!.pub}\n` });
    await addUser(dir, 'bob', K.ed[2]!.pub);
    const after = readFileSync(join(dir, 'users.nix'));
    expectInsertion(before, after, '  { name = "bob"; keys = ./keys/bob; }\n');
    await checkClean(dir);
    await addUser(dir, 'dave', K.ed[3]!.pub);
    await checkClean(dir);
    await removeUser(dir, 'dave');
    await removeUser(dir, 'bob');
    expect(readFileSync(join(dir, 'users.nix')).equals(before)).toBe(true);
    // Removing carol takes her trailing comment with her line.
    await removeUser(dir, 'carol');
    expect(readFileSync(join(dir, 'users.nix'), 'utf8')).toBe(
      '# users\n[\n  { name = "alice"; trusted = true; keys = ./keys/alice; }\n]\n',
    );
  });

  test('list form with multi-line entries separated by blank lines', async () => {
    const dir = newDir();
    const before = Buffer.from(
      '[\n  {\n      name = "alice";\n      keys = ./keys/alice;\n  }\n\n  {\n      name = "carol";\n      keys = ./keys/carol;\n  }\n]\n',
    );
    writeTree(dir, { 'users.nix': before, 'keys/alice': `${K.ed[0]!.pub}\n`, 'keys/carol': `${K.ed[1]!.pub}\n` });
    await addUser(dir, 'bob', K.ed[2]!.pub, { trusted: true });
    const after = readFileSync(join(dir, 'users.nix'));
    expectInsertion(
      before,
      after,
      '  {\n      name = "bob";\n      trusted = true;\n      keys = ./keys/bob;\n  }\n\n',
    );
    await checkClean(dir);
    await removeUser(dir, 'bob');
    expect(readFileSync(join(dir, 'users.nix')).equals(before)).toBe(true);
  });

  test('everything on one line', async () => {
    const dir = newDir();
    const before = '{ alice = { keys = ./keys/alice; }; carol = { keys = ./keys/carol; }; }';
    writeTree(dir, { 'users.nix': before, 'keys/alice': `${K.ed[0]!.pub}\n`, 'keys/carol': `${K.ed[1]!.pub}\n` });
    await addUser(dir, 'bob', K.ed[2]!.pub);
    expect(readFileSync(join(dir, 'users.nix'), 'utf8')).toBe(
      '{ alice = { keys = ./keys/alice; }; bob = { keys = ./keys/bob; }; carol = { keys = ./keys/carol; }; }',
    );
    await addUser(dir, 'dave', K.ed[3]!.pub);
    expect(readFileSync(join(dir, 'users.nix'), 'utf8')).toBe(
      '{ alice = { keys = ./keys/alice; }; bob = { keys = ./keys/bob; }; carol = { keys = ./keys/carol; }; dave = { keys = ./keys/dave; }; }',
    );
    await checkClean(dir);
    await removeUser(dir, 'dave');
    await removeUser(dir, 'bob');
    expect(readFileSync(join(dir, 'users.nix'), 'utf8')).toBe(before);
  });

  test('an empty set, a set holding only comments, a missing users.nix', async () => {
    expect(insertUserEntry('{ }\n', 'alice')).toBe('{\n  alice = {\n    keys = ./keys/alice;\n  };\n}\n');
    expect(insertUserEntry('[]', 'alice')).toBe('[\n  {\n    name = "alice";\n    keys = ./keys/alice;\n  }\n]');
    expect(insertUserEntry('{\n  # nobody yet\n}\n', 'alice')).toBe(
      '{\n  # nobody yet\n  alice = {\n    keys = ./keys/alice;\n  };\n}\n',
    );
    const dir = newDir();
    const r = await addUser(dir, 'alice', K.ed[0]!.pub, { sudo: true, trusted: true });
    expect(r.created).toBe(true);
    expect(readFileSync(join(dir, 'users.nix'), 'utf8')).toBe(
      '{\n  alice = {\n    trusted = true;\n    sudo = true;\n    keys = ./keys/alice;\n  };\n}\n',
    );
    await checkClean(dir);
  });

  test('CRLF files keep CRLF', () => {
    const before = '{\r\n  alice = {\r\n    keys = ./keys/alice;\r\n  };\r\n}\r\n';
    const after = insertUserEntry(before, 'bob');
    expect(after).toBe(
      '{\r\n  alice = {\r\n    keys = ./keys/alice;\r\n  };\r\n  bob = {\r\n    keys = ./keys/bob;\r\n  };\r\n}\r\n',
    );
    expect(removeUserEntry(after, 'bob')).toBe(before);
  });

  test('dotted entries of one user are all removed', () => {
    const before = '{\n  alice.keys = ./keys/alice;\n  bob.trusted = true;\n  bob.keys = ./keys/bob;\n}\n';
    expect(removeUserEntry(before, 'bob')).toBe('{\n  alice.keys = ./keys/alice;\n}\n');
    expect(removeUserEntry(before, 'carol')).toBeUndefined();
  });

  test('the file mode is kept', async () => {
    const dir = newDir();
    writeTree(dir, { 'users.nix': '{\n}\n' });
    chmodSync(join(dir, 'users.nix'), 0o640);
    await addUser(dir, 'alice', K.ed[0]!.pub);
    expect(statSync(join(dir, 'users.nix')).mode & 0o777).toBe(0o640);
    expect(readdirSync(dir).sort()).toEqual(['keys', 'users.nix']); // no temporary files left
  });
});

describe('many inserts and removals in scrambled order, every layout', () => {
  const layouts: Record<string, string> = {
    community: COMMUNITY.toString('latin1'),
    'list, one line each':
      '[\n  { name = "alice"; keys = ./keys/alice; }\n  { name = "mike"; keys = ./keys/mike; }\n]\n',
    'list, blocks':
      '[\n  {\n    name = "alice";\n    keys = ./keys/alice;\n  }\n\n  {\n    name = "mike";\n    keys = ./keys/mike;\n  }\n]\n',
    inline: '{ alice = { keys = ./keys/alice; }; mike = { keys = ./keys/mike; }; }\n',
    crlf: '{\r\n  alice = {\r\n    keys = ./keys/alice;\r\n  };\r\n\r\n  mike = {\r\n    keys = ./keys/mike;\r\n  };\r\n}\r\n',
    empty: '{ }\n',
    dotted: '{\n  alice.keys = ./keys/alice;\n  mike.keys = ./keys/mike;\n}\n',
  };
  const names = ['zed', '0x00', 'bob', 'Nina', 'aaron', 'carol-x', 'm.n', 'yuki', 'b_2', 'mikey'];
  // A fixed scramble (deterministic), different for removal.
  const addOrder = [3, 7, 0, 5, 9, 1, 8, 2, 6, 4].map((i) => names[i]!);
  const removeOrder = [8, 1, 4, 6, 0, 9, 3, 5, 2, 7].map((i) => names[i]!);

  test.each(Object.keys(layouts))('%s', (layout) => {
    const original = layouts[layout]!;
    let text = original;
    for (const n of addOrder) {
      const next = insertUserEntry(text, n, { trusted: n.length % 2 === 0 });
      // (An empty `{ }` gets its inside laid out once; everything else is a pure insertion.)
      if (!(layout === 'empty' && text === original)) expect(isPureInsertion(text, next)).toBe(true);
      text = next;
    }
    const parsed = parseNixData(Buffer.from(text, 'latin1'), 'users.nix');
    expect(parsed.errors).toEqual([]);
    const v = parsed.value!;
    const order =
      v.kind === 'attrs'
        ? [...new Set(v.entries.map((e) => e.path[0]!.name))]
        : v.kind === 'list'
          ? v.items.map((i) =>
              i.kind === 'attrs' && i.fields.get('name')?.value.kind === 'string'
                ? (i.fields.get('name')!.value as { value: string }).value
                : '',
            )
          : [];
    expect(order).toEqual([...order].sort(compareUserNames));
    expect(order.length).toBe(names.length + (layout === 'community' ? 3 : layout === 'empty' ? 0 : 2));
    for (const n of removeOrder) text = removeUserEntry(text, n)!;
    if (layout === 'empty') expect(text).toBe('{\n}\n');
    else expect(text).toBe(original);
  });
});

describe('refusals leave everything as it was', () => {
  async function refused(dir: string, fn: () => Promise<unknown>, message: RegExp | string) {
    const before = snapshot(dir);
    const err = await fn().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(RegistryEditError);
    if (typeof message === 'string') expect((err as Error).message).toBe(message);
    else expect((err as Error).message).toMatch(message);
    expect(snapshot(dir)).toEqual(before);
    return err as RegistryEditError;
  }

  function snapshot(dir: string): Record<string, string> {
    const out: Record<string, string> = {};
    const walk = (d: string, rel: string) => {
      for (const e of readdirSync(d, { withFileTypes: true })) {
        const p = join(d, e.name);
        if (e.isDirectory()) walk(p, `${rel}${e.name}/`);
        else out[`${rel}${e.name}`] = readFileSync(p, 'latin1');
      }
    };
    walk(dir, '');
    return out;
  }

  test('existing name, someone else’s key, a private key, an invalid name, a key file already there', async () => {
    const dir = communityDir();
    await refused(
      dir,
      () => addUser(dir, 'aszlig', K.ed[5]!.pub),
      'user "aszlig" already exists (' + join(dir, 'users.nix').replace(`${process.cwd()}/`, '') + ':14:3)',
    );
    const fp = (await loadRegistry(dir)).users.get('grahamc')!.keys[0]!.fingerprint;
    await refused(
      dir,
      () => addUser(dir, 'mallory', `${K.ed[2]!.pub.replace('user2@host', 'mine')}\n`),
      new RegExp(
        `^key ${fp.replace(/[+/]/g, '\\$&')} is already in .*keys/grahamc:1 \\(user "grahamc"\\); a key belongs to one user$`,
      ),
    );
    // The sk- key of grahamc counts too.
    await refused(dir, () => addUser(dir, 'mallory', K.skEd), /is already in .*keys\/grahamc:2 \(user "grahamc"\)/);
    await refused(
      dir,
      () => addUser(dir, 'bob', K.ed[5]!.priv, { keyLabel: '/home/bob/.ssh/id_ed25519' }),
      '/home/bob/.ssh/id_ed25519 is a PRIVATE key: give the public key instead (the .pub file, or ssh-keygen -y -f KEY). Nothing was written.',
    );
    await refused(
      dir,
      () => addUser(dir, 'bad name', K.ed[5]!.pub),
      'invalid user name "bad name": a unix login name uses only A-Z a-z 0-9 . _ -',
    );
    const weak = await refused(
      dir,
      () => addUser(dir, 'bob', `${K.ed[5]!.pub}\n${K.rsa1024.pub}\n`),
      'the key has lines that are not usable public keys; nothing was written',
    );
    expect(weak.details).toEqual([
      'line 2:1: RSA key of 1024 bits is too weak: at least 2048 bits are required (make a new key: ssh-keygen -t ed25519)',
    ]);
    await refused(dir, () => addUser(dir, 'bob', '# nothing\n'), 'no public key found in the key');
    await refused(
      dir,
      () => addUser(dir, 'bob', K.ed[5]!.pub, { vouchedBy: ['zed'] }),
      'unknown voucher "zed": there is no such user',
    );
    writeFileSync(join(dir, 'keys/bob'), 'leftover\n');
    await refused(
      dir,
      () => addUser(dir, 'bob', K.ed[5]!.pub),
      /keys\/bob already exists; remove it or choose another name$/,
    );
  });

  test('a users.nix with syntax errors is not edited', async () => {
    const dir = newDir();
    writeTree(dir, { 'users.nix': '{ alice = import ./x; }\n' });
    const e = await refused(dir, () => addUser(dir, 'bob', K.ed[0]!.pub), /users\.nix has errors; fix them first$/);
    expect(e.details).toEqual([expect.stringMatching(/users\.nix:1:11: `import` is not allowed \(plain data only\)$/)]);
    await refused(dir, () => removeUser(dir, 'alice'), /users\.nix has errors; fix them first$/);
  });

  test('removing an unknown user', async () => {
    const dir = communityDir();
    await refused(dir, () => removeUser(dir, 'nobody'), /^no user "nobody" in .*users\.nix$/);
  });
});

describe('the CLI', () => {
  async function cli(args: string[], stdin = '') {
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
      stdin: async () => Buffer.from(stdin),
      env: {},
    });
    const saved = process.exitCode;
    await program.parseAsync(['node', 'buildbox', ...args]);
    const code = process.exitCode;
    process.exitCode = saved;
    return { code, out, err };
  }

  test('users add --key - (stdin), users add --key FILE, users check, users remove', async () => {
    const dir = communityDir();
    const add = await cli(['users', 'add', 'bob', '--key', '-', '--registry', dir, '--trusted'], `${K.ed[3]!.pub}\n`);
    expect(add.err).toBe('');
    expect(add.code).toBe(0);
    expect(add.out).toMatch(/^added user "bob": .*keys\/bob \(SHA256:[A-Za-z0-9+/]{43}\), updated .*users\.nix\n$/);

    const add2 = await cli(['users', 'add', 'carl', '--key', K.ed[4]!.file + '.pub', '--registry', dir]);
    expect(add2.code).toBe(0);
    const check = await cli(['users', 'check', dir, '--strict']);
    expect(check.code).toBe(0);
    expect(check.err).toBe('users check: 5 users, no problems\n');

    const priv = await cli(['users', 'add', 'dan', '--key', K.ed[5]!.file, '--registry', dir]);
    expect(priv.code).toBe(1);
    expect(priv.err).toBe(
      `buildbox users add: ${K.ed[5]!.file} is a PRIVATE key: give the public key instead (the .pub file, or ssh-keygen -y -f KEY). Nothing was written.\n`,
    );
    const missing = await cli(['users', 'add', 'dan', '--key', join(dir, 'nope.pub'), '--registry', dir]);
    expect(missing.code).toBe(2);
    expect(missing.err).toMatch(/^buildbox users add: ENOENT: no such file or directory/);

    for (const n of ['bob', 'carl']) {
      const rm = await cli(['users', 'remove', n, '--registry', dir]);
      expect(rm.code).toBe(0);
      expect(rm.out).toMatch(new RegExp(`^removed user "${n}" from .*users\\.nix and .*keys/${n}\\n$`));
    }
    expect(readFileSync(join(dir, 'users.nix')).equals(COMMUNITY)).toBe(true);
    const again = await cli(['users', 'remove', 'bob', '--registry', dir]);
    expect(again.code).toBe(1);
    expect(again.err).toMatch(/^buildbox users remove: no user "bob" in .*users\.nix\n$/);
  });
});
