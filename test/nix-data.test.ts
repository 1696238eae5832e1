// biome-ignore-all lint/suspicious/noTemplateCurlyInString: these tests are about `${…}` written literally in Nix text
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import {
  isPlainIdentifier,
  type NixAttrs,
  parseNixData,
  quoteNixString,
  renderAttrName,
  toPlain,
} from '../src/nix-data.js';
import { tempDir } from './helpers/exec.js';
import { nix28 } from './helpers/nix.js';

const tmp = tempDir('buildbox-nixdata-');
afterAll(() => tmp.cleanup());

function errorsOf(text: string): string[] {
  return parseNixData(text, 'users.nix').errors.map((e) => e.message);
}

function ok(text: string) {
  const r = parseNixData(text, 'users.nix');
  expect(r.errors.map((e) => e.message)).toEqual([]);
  expect(r.value).toBeDefined();
  return r;
}

const COMMUNITY = `# 1. Generate an SSH key and add the public key to ./keys/youruser
#
# 2. Copy / paste this in order, alphabetically.
{
  "0x4A6F" = {
    trusted = true;
    keys = ./keys/0x4A6F;
  };

  aszlig = {
    trusted = true;
    keys = keys/aszlig; # no ./ — still a path
  };

  /* admins */
  grahamc = {
    sudo = true;
    trusted = true;
    password = "$6$lAjIm6PyElKewH$WfO/3pGei09Ys";
    keys = ./keys/grahamc;
  };
}
`;

describe('data that parses', () => {
  test('a community-style attribute set: values, quoted names, comments, paths without ./', () => {
    const r = ok(COMMUNITY);
    expect(toPlain(r.value!)).toEqual({
      '0x4A6F': { trusted: true, keys: { path: './keys/0x4A6F' } },
      aszlig: { trusted: true, keys: { path: 'keys/aszlig' } },
      grahamc: {
        sudo: true,
        trusted: true,
        password: '$6$lAjIm6PyElKewH$WfO/3pGei09Ys',
        keys: { path: './keys/grahamc' },
      },
    });
  });

  test('entries carry exact byte ranges and line:col positions', () => {
    const r = ok(COMMUNITY);
    const top = r.value as NixAttrs;
    const bytes = Buffer.from(COMMUNITY); // offsets are bytes (the file has a multi-byte dash in a comment)
    const slice = (a: number, b: number) => bytes.subarray(a, b).toString();
    expect(top.entries.map((e) => e.path[0]!.name)).toEqual(['0x4A6F', 'aszlig', 'grahamc']);
    const e0 = top.entries[0]!;
    expect(slice(e0.span.start, e0.span.end)).toBe(
      '"0x4A6F" = {\n    trusted = true;\n    keys = ./keys/0x4A6F;\n  };',
    );
    expect(e0.path[0]!.quoted).toBe(true);
    expect([e0.span.line, e0.span.col, e0.span.endLine, e0.span.endCol]).toEqual([5, 3, 8, 5]);
    const grahamc = top.fields.get('grahamc')!;
    expect([grahamc.nameSpan.line, grahamc.nameSpan.col]).toEqual([16, 3]);
    const keys = (grahamc.value as NixAttrs).fields.get('keys')!.value;
    expect(slice(keys.span.start, keys.span.end)).toBe('./keys/grahamc');
    expect([keys.span.line, keys.span.col]).toEqual([20, 12]);
    expect(slice(top.span.start, top.span.end).startsWith('{\n  "0x4A6F"')).toBe(true);
    expect(top.span.end).toBe(bytes.length - 1);
  });

  test('list form with element ranges', () => {
    const text = '[\n  { name = "alice"; keys = ./keys/alice; }\n  { name = "bob"; trusted = false; }\n]\n';
    const r = ok(text);
    expect(r.value!.kind).toBe('list');
    if (r.value!.kind !== 'list') return;
    const [a, b] = r.value!.items;
    expect(text.slice(a!.span.start, a!.span.end)).toBe('{ name = "alice"; keys = ./keys/alice; }');
    expect([b!.span.line, b!.span.col]).toEqual([3, 3]);
    expect(toPlain(r.value!)).toEqual([
      { name: 'alice', keys: { path: './keys/alice' } },
      { name: 'bob', trusted: false },
    ]);
  });

  test('columns count characters and offsets count bytes', () => {
    const text = '{ "é" = 1; x = foo; }';
    const r = parseNixData(text, 'f.nix');
    expect(r.errors.map((e) => `${e.line}:${e.col}: ${e.reason}`)).toEqual([
      '1:16: variable `foo` is not allowed (plain data only); quote it if you meant a string',
    ]);
    expect(r.errors[0]!.offset).toBe(16); // é is two bytes
    const r2 = ok('{ "é" = "ü"; }');
    const f = (r2.value as NixAttrs).fields.get('é')!;
    expect([f.nameSpan.start, f.nameSpan.end, f.nameSpan.col, f.nameSpan.endCol]).toEqual([2, 6, 3, 6]);
    expect(toPlain(f.value)).toBe('ü');
  });

  test('dotted attribute paths merge into nested sets', () => {
    const r = ok('{ alice.trusted = true; alice.keys = ./keys/alice; bob = { jobs = 2; }; bob.sudo = false; }');
    expect(toPlain(r.value!)).toEqual({
      alice: { trusted: true, keys: { path: './keys/alice' } },
      bob: { jobs: 2, sudo: false },
    });
  });

  test('strings, indented strings, numbers, booleans and null agree with the real Nix', async () => {
    const text = [
      '{',
      '  a = "tab\\there \\"quoted\\" \\\\ \\$ \\${not} $${x} $ dollar";',
      "  b = ''",
      '      first',
      '        indented',
      "      keep ''$ ''' ''\\t end",
      "    '';",
      "  c = ''one line'';",
      '  d = [ 1 0 42 3.5 .5 1.0e3 true false null "x" ];',
      '  e = -7;',
      '  f = { };',
      '  g = [ ];',
      '  "with space" = "é ü 日本";',
      '  nested.deeper.value = 1;',
      '  h = "multi',
      'line";',
      '}',
    ].join('\n');
    const r = ok(text);
    const f = join(tmp.path, 'strings.nix');
    writeFileSync(f, text);
    const out = await nix28('nix-instantiate', ['--eval', '--strict', '--json', f]);
    expect(toPlain(r.value!)).toEqual(JSON.parse(out.stdout));
  });

  test('a file that Nix refuses is refused too (nix agrees it is not data)', async () => {
    const f = join(tmp.path, 'bad.nix');
    writeFileSync(f, '[ 1 -2 ]');
    const nix = await nix28('nix-instantiate', ['--eval', '--strict', '--json', f], { allowFail: true });
    expect(nix.code).not.toBe(0);
    expect(errorsOf('[ 1 -2 ]')).toEqual(['users.nix:1:5: operator `-` is not allowed (plain data only)']);
  });
});

describe('everything that is not data is refused with file:line:col and the construct', () => {
  const cases: Array<[string, string, string[]]> = [
    ['let', 'let x = 1; in { a = x; }', ['users.nix:1:1: `let … in` is not allowed (plain data only)']],
    ['function', '{ pkgs, ... }: { }', ['users.nix:1:1: function definition is not allowed (plain data only)']],
    ['lambda', 'x: { }', ['users.nix:1:1: function definition is not allowed (plain data only)']],
    ['with', 'with import <nixpkgs> {}; { }', ['users.nix:1:1: `with` is not allowed (plain data only)']],
    ['import', '{ a = import ./x.nix; }', ['users.nix:1:7: `import` is not allowed (plain data only)']],
    ['rec', 'rec { a = 1; }', ['users.nix:1:1: recursive attribute set `rec { … }` is not allowed (plain data only)']],
    ['inherit', '{ inherit a; }', ['users.nix:1:3: `inherit` is not allowed (plain data only)']],
    [
      'interpolation',
      '{ a = "x${y}"; }',
      ['users.nix:1:9: string interpolation `${…}` is not allowed (plain data only)'],
    ],
    [
      'interpolation in an indented string',
      "{ a = ''\n  x ${y}\n''; }",
      ['users.nix:2:5: string interpolation `${…}` is not allowed (plain data only)'],
    ],
    [
      'interpolation in a path',
      '{ keys = ./keys/${name}; }',
      ['users.nix:1:17: string interpolation `${…}` is not allowed (plain data only)'],
    ],
    [
      'dynamic name',
      '{ ${"a"} = 1; }',
      ['users.nix:1:3: dynamic attribute name `${…}` is not allowed (plain data only)'],
    ],
    ['operator', '{ a = [ 1 ] ++ [ 2 ]; }', ['users.nix:1:13: operator `++` is not allowed (plain data only)']],
    ['update', '{ a = { } // { }; }', ['users.nix:1:11: operator `//` is not allowed (plain data only)']],
    [
      'application',
      '{ a = f x; }',
      ['users.nix:1:7: variable `f` is not allowed (plain data only); quote it if you meant a string'],
    ],
    [
      'application of data',
      '{ a = { } "x"; }',
      ['users.nix:1:11: function application is not allowed (plain data only)'],
    ],
    [
      'selection',
      '{ a = { b = 1; }.b; }',
      ['users.nix:1:17: attribute selection `.` is not allowed (plain data only)'],
    ],
    ['parentheses', '{ a = (1); }', ['users.nix:1:7: parenthesised expression is not allowed (plain data only)']],
    ['search path', '{ a = <nixpkgs>; }', ['users.nix:1:7: search path `<nixpkgs>` is not allowed (plain data only)']],
    ['home path', '{ a = ~/keys; }', ['users.nix:1:7: home-relative path `~/keys` is not allowed (plain data only)']],
    [
      'URL',
      '{ a = https://example.org/x; }',
      [
        'users.nix:1:7: unquoted URL `https://example.org/x` is not allowed; write it as a string "https://example.org/x"',
      ],
    ],
    ['if', '{ a = if true then 1 else 2; }', ['users.nix:1:7: `if … then … else` is not allowed (plain data only)']],
    ['assert', '{ a = assert true; 1; b = 2; }', ['users.nix:1:7: `assert` is not allowed (plain data only)']],
  ];
  test.each(cases)('%s', (_name, text, expected) => {
    expect(parseNixData(text, 'users.nix').errors.map((e) => e.message)).toEqual(expected);
    expect(parseNixData(text, 'users.nix').value).toBeUndefined();
  });
});

describe('syntax errors', () => {
  const cases: Array<[string, string, string[]]> = [
    ['missing semicolon', '{\n  a = 1\n  b = 2;\n}', ['users.nix:2:8: missing `;` after the value of `a`']],
    ['missing =', '{ a 1; }', ['users.nix:1:5: expected `=` after `a`, found `1`']],
    ['unclosed set', '{ a = 1;', ['users.nix:1:1: unclosed `{` (missing `}`)']],
    [
      'unclosed list',
      '{ a = [ 1 2; }',
      [
        'users.nix:1:12: unexpected `;` in a list (list elements are separated by spaces)',
        'users.nix:1:14: unclosed `[` at 1:7 (missing `]`)',
      ],
    ],
    ['list missing ]', '{ a = [ 1 2 }', ['users.nix:1:13: unclosed `[` at 1:7 (missing `]`)']],
    ['set missing } in a list', '[ { name = "a"; ]', ['users.nix:1:17: unclosed `{` at 1:3 (missing `}`)']],
    ['unterminated string', '{ a = "abc; }', ['users.nix:1:7: unterminated string (opened here)']],
    ['unterminated comment', '{ a = 1; /* x', ['users.nix:1:10: unterminated comment `/* … */` (opened here)']],
    ['duplicate', '{ a = 1;\n  a = 2; }', ['users.nix:2:3: attribute `a` is already defined at 1:3']],
    ['duplicate via path', '{ a.b = 1; a.b = 2; }', ['users.nix:1:14: attribute `a.b` is already defined at 1:5']],
    ['empty file', '  # nothing\n', ['users.nix:2:1: expected a value, found end of file']],
    ['trailing data', '{ } { }', ['users.nix:1:5: function application is not allowed (plain data only)']],
    ['trailing junk', '{ } ;', ['users.nix:1:5: unexpected `;` after the end of the data']],
    ['bad character', '{ a = 1; } %', ['users.nix:1:12: unexpected character `%`']],
    ['keyword as name', '{ let = 1; }', ['users.nix:1:3: keyword `let` cannot be an attribute name; quote it: "let"']],
    ['trailing slash', '{ a = ./keys/; }', ['users.nix:1:7: path `./keys/` has a trailing slash']],
    ['big integer', '{ a = 99999999999999999999; }', ['users.nix:1:7: integer 99999999999999999999 is out of range']],
  ];
  test.each(cases)('%s', (_name, text, expected) => {
    expect(parseNixData(text, 'users.nix').errors.map((e) => e.message)).toEqual(expected);
  });

  test('hostile nesting is refused, not a stack overflow', () => {
    const deep = `${'['.repeat(100000)}${']'.repeat(100000)}`;
    expect(errorsOf(deep)).toEqual(['users.nix:1:65: nested deeper than 64 levels']);
    const ok64 = `${'['.repeat(64)}${']'.repeat(64)}`;
    expect(errorsOf(ok64)).toEqual([]);
    const sets = `${'{ a = '.repeat(100)}1${'; }'.repeat(100)}`;
    expect(errorsOf(sets)).toEqual(['users.nix:1:385: nested deeper than 64 levels']);
  });

  test('many errors are collected in one pass, in source order', () => {
    const text = [
      '{',
      '  alice = { keys = import ./keys/alice; trusted = true; };',
      '  bob = { keys = ./keys/${x}; };',
      '  carol = { vouchedBy = [ "alice" ] ++ extra; };',
      '  dave = { trusted = true };',
      '  eve = { keys = ./keys/eve; };',
      '  inherit frank;',
      '}',
    ].join('\n');
    expect(errorsOf(text)).toEqual([
      'users.nix:2:20: `import` is not allowed (plain data only)',
      'users.nix:3:25: string interpolation `${…}` is not allowed (plain data only)',
      'users.nix:4:37: operator `++` is not allowed (plain data only)',
      'users.nix:5:26: missing `;` after the value of `trusted`',
      'users.nix:7:3: `inherit` is not allowed (plain data only)',
    ]);
  });
});

test('helpers for writing Nix', () => {
  expect(isPlainIdentifier('alice')).toBe(true);
  expect(isPlainIdentifier('cole-h')).toBe(true);
  expect(isPlainIdentifier("a'b")).toBe(true);
  expect(isPlainIdentifier('0x4A6F')).toBe(false);
  expect(isPlainIdentifier('rec')).toBe(false);
  expect(renderAttrName('0x4A6F')).toBe('"0x4A6F"');
  expect(renderAttrName('a.b')).toBe('"a.b"');
  expect(quoteNixString('a"b\\c${d}\n')).toBe('"a\\"b\\\\c\\${d}\\n"');
  const r = ok(`{ ${renderAttrName('x.y')} = ${quoteNixString('a"b\\c${d}\n')}; }`);
  expect(toPlain(r.value!)).toEqual({ 'x.y': 'a"b\\c${d}\n' });
});
