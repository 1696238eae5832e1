import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type BasicDerivation,
  builtOutputs,
  checkFixedOutputHash,
  computeOutputPaths,
  type Derivation,
  DerivationAttrs,
  DerivationError,
  derivationKind,
  derivationPath,
  drvNameFromPath,
  drvOutputId,
  fixedOutputCa,
  hashDerivationModulo,
  hashMismatchMessage,
  hashPlaceholder,
  isContentAddressed,
  isFixedOutput,
  isSandboxed,
  parseDerivation,
  parseDrvOutputId,
  parseRealisation,
  passAsFileName,
  printDerivation,
  readBasicDerivation,
  realisationJson,
  requiredSystemFeatures,
  unknownCaOutputPlaceholder,
  writeBasicDerivation,
} from '../src/derivation.js';
import { Hash, hashBytes, sha256 } from '../src/hash.js';
import { encodeString, encodeU64, WireReader, WireWriter } from '../src/wire.js';
import { tempDir } from './helpers/exec.js';
import { nix28, nixEnv } from './helpers/nix.js';

const tmp = tempDir('buildbox-drv-');
afterAll(() => tmp.cleanup());

const readDrv = (p: string) => readFileSync(p).toString('latin1');
const loadDrv = (p: string): Derivation => parseDerivation(readDrv(p), drvNameFromPath(p));

// §5.5 worked example A, byte for byte as stored by Nix 2.8.
const FOD_PATH = '/nix/store/3mk786rjnkjac12azzzj3fdjg40gm7nb-fod.drv';
const FOD_TEXT =
  'Derive([("out","/nix/store/rcz8aqa9lzcygdcn1q53xz03vc3svrcp-fod","sha256","5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")],[],[],"x86_64-linux","/bin/sh",["-c","echo hello > $out"],[("builder","/bin/sh"),("name","fod"),("out","/nix/store/rcz8aqa9lzcygdcn1q53xz03vc3svrcp-fod"),("outputHash","5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),("outputHashAlgo","sha256"),("outputHashMode","flat"),("system","x86_64-linux")])';
const DEMO_PATH = '/nix/store/b4zk1pmc4vxvlnkjl54isv2lixdr9lll-demo.drv';
const DEMO_TEXT =
  'Derive([("dev","/nix/store/d2rch1690vmdj9x8byy81h3n1pqpbn3g-demo-dev","",""),("out","/nix/store/2llmmjm433f590zck8372x39spgcdsl4-demo","","")],[("/nix/store/3mk786rjnkjac12azzzj3fdjg40gm7nb-fod.drv",["out"])],["/nix/store/wch608fni0wbbnm4bp24ha2fpdx3yaij-src.txt"],"x86_64-linux","/bin/sh",["-c","echo ok"],[("builder","/bin/sh"),("dev","/nix/store/d2rch1690vmdj9x8byy81h3n1pqpbn3g-demo-dev"),("fod","/nix/store/rcz8aqa9lzcygdcn1q53xz03vc3svrcp-fod"),("name","demo"),("out","/nix/store/2llmmjm433f590zck8372x39spgcdsl4-demo"),("outputs","out dev"),("q","a\\"b\\\\c\\nd"),("src","/nix/store/wch608fni0wbbnm4bp24ha2fpdx3yaij-src.txt"),("system","x86_64-linux")])';

describe('spec vectors (§5.5, §6.1)', () => {
  const fod = parseDerivation(FOD_TEXT, 'fod');
  const demo = parseDerivation(DEMO_TEXT, 'demo');
  const load = (p: string) => (p === FOD_PATH ? fod : undefined);

  it('parses and prints byte for byte, and computes the .drv paths', () => {
    expect(printDerivation(fod)).toBe(FOD_TEXT);
    expect(printDerivation(demo)).toBe(DEMO_TEXT);
    expect(derivationPath(fod)).toBe(FOD_PATH);
    expect(derivationPath(demo)).toBe(DEMO_PATH);
    expect(demo.env.get('q')).toBe('a"b\\c\nd');
    expect(demo.inputDrvs).toEqual(new Map([[FOD_PATH, ['out']]]));
    expect(derivationKind(fod)).toBe('fixed');
    expect(derivationKind(demo)).toBe('inputAddressed');
  });

  it('computes hash modulo and output paths', () => {
    expect(hashDerivationModulo(fod, true, load).get('out')!.toBase16()).toBe(
      'ec3379b85eb3c32824b1aee3fb9c7ce6247153d2332d23e70327ef21f3882cd4',
    );
    const masked = hashDerivationModulo(demo, true, load);
    expect(masked.get('out')!.toBase16()).toBe('0697f4148e0fc216d4d9658a202ea6f746beb8267c23fab3b96b1f0338609ccf');
    expect(masked.get('dev')!.toBase16()).toBe('0697f4148e0fc216d4d9658a202ea6f746beb8267c23fab3b96b1f0338609ccf');
    expect(computeOutputPaths(demo, load)).toEqual(
      new Map([
        ['dev', '/nix/store/d2rch1690vmdj9x8byy81h3n1pqpbn3g-demo-dev'],
        ['out', '/nix/store/2llmmjm433f590zck8372x39spgcdsl4-demo'],
      ]),
    );
    expect(computeOutputPaths(fod, load)).toEqual(
      new Map([['out', '/nix/store/rcz8aqa9lzcygdcn1q53xz03vc3svrcp-fod']]),
    );
    expect(() => hashDerivationModulo(demo, true, () => undefined)).toThrow(
      /input derivation '.*-fod.drv' of derivation 'demo' is not available/,
    );
  });

  it('computes the DrvOutput hash of the BasicDerivation a client would send', () => {
    const basic: BasicDerivation = {
      ...demo,
      inputSrcs: [
        '/nix/store/wch608fni0wbbnm4bp24ha2fpdx3yaij-src.txt',
        '/nix/store/rcz8aqa9lzcygdcn1q53xz03vc3svrcp-fod',
      ],
    };
    delete (basic as Partial<Derivation>).inputDrvs;
    const h = hashDerivationModulo(basic, true, () => undefined).get('out')!;
    expect(h.toBase16()).toBe('a77c63a4c21ba78666658963ad2a42db0118e92dcae121799189c14f859626a1');
    expect(drvOutputId(h, 'out')).toBe('sha256:a77c63a4c21ba78666658963ad2a42db0118e92dcae121799189c14f859626a1!out');
    const bo = builtOutputs(basic, computeOutputPaths(demo, load));
    expect([...bo.keys()]).toEqual([`sha256:${h.toBase16()}!dev`, `sha256:${h.toBase16()}!out`]);
    expect(bo.get(`sha256:${h.toBase16()}!out`)).toBe(
      `{"dependentRealisations":{},"id":"sha256:${h.toBase16()}!out","outPath":"2llmmjm433f590zck8372x39spgcdsl4-demo","signatures":[]}`,
    );
    // a Derivation passed to builtOutputs is hashed as the BasicDerivation it contains (no inputDrvs)
    expect(builtOutputs(demo, new Map()).size).toBe(0);
  });

  it('renders realisations like §2.6', () => {
    const id = 'sha256:efab6512b1de06eeb55fd2907ab7786515959b11cc35f51ef72c157c5ab69202!out';
    const json = realisationJson({ id, outPath: '/nix/store/45z1l3ic8la08n9yk8qkdmw66i32c1mg-logger' });
    expect(json).toBe(
      '{"dependentRealisations":{},"id":"sha256:efab6512b1de06eeb55fd2907ab7786515959b11cc35f51ef72c157c5ab69202!out","outPath":"45z1l3ic8la08n9yk8qkdmw66i32c1mg-logger","signatures":[]}',
    );
    expect(parseRealisation(json)).toEqual({
      id,
      outPath: '45z1l3ic8la08n9yk8qkdmw66i32c1mg-logger',
      signatures: [],
      dependentRealisations: {},
    });
    const p = parseDrvOutputId(id);
    expect(p.outputName).toBe('out');
    expect(drvOutputId(p.hash, p.outputName)).toBe(id);
    expect(() => parseDrvOutputId('efab!out')).toThrow(/does not include a type/);
    expect(() => parseDrvOutputId('sha256:efab')).toThrow(/no '!'/);
    expect(() => parseRealisation('{"id":"x"}')).toThrow(/"outPath" strings are required/);
  });
});

describe('ATerm parser errors', () => {
  const bad: Array<[string, RegExp]> = [
    ['', /expected 'Derive\(', got end of file \(at byte 0\)/],
    ['Derive([', /expected '\(', got end of file \(at byte 8\)/],
    ['Derive([("out","/nix/store/x","","")],[],[],"","",[],[])', /output 'out': .*not a valid store path/],
    [FOD_TEXT.replace('"x86_64-linux","/bin/sh"', '"x86_64-linux" "/bin/sh"'), /expected ',', got " \\"\/bin\/sh/],
    [`${FOD_TEXT}\n`, /unexpected data after the end of the derivation/],
    [FOD_TEXT.replace('("name","fod")', '("name","fod)'), /expected '\)'/],
    [FOD_TEXT.replace('"echo hello > $out"', '"echo hello > $out'), /expected '\)'|expected ','/],
    [FOD_TEXT.slice(0, 200), /unterminated string|expected/],
    [FOD_TEXT.replace('[],[],', '[],["relative"],'), /input source 'relative' is not an absolute path/],
    [FOD_TEXT.replace('"sha256","5891', '"sha3","5891'), /unknown hash algorithm 'sha3'/],
    [FOD_TEXT.replace('"sha256","5891', '"sha256","x891'), /invalid base16/],
    [FOD_TEXT.replace('[("out","/nix/store/rcz', '[("dev","/nix/store/rcz'), /single fixed output must be named "out"/],
    [
      DEMO_TEXT.replace('("out","/nix/store/2llmmjm433f590zck8372x39spgcdsl4-demo","","")', '("out","","r:sha256","")'),
      /can't mix derivation output types/,
    ],
    [DEMO_TEXT.replace('("dev","/nix', '("out","/nix'), /duplicate output 'out'/],
    [DEMO_TEXT.replace('("name","demo")', '("name","demo"),("name","x")'), /duplicate environment variable 'name'/],
    [
      DEMO_TEXT.replace('3mk786rjnkjac12azzzj3fdjg40gm7nb-fod.drv', '3mk786rjnkjac12azzzj3fdjg40gm7nb-fod'),
      /does not end in .drv/,
    ],
    ['DrvWithVersion("xp-dyn-drv",[])', /dynamic derivations\) are not supported/],
    [
      `Derive([("out","/nix/store/2llmmjm433f590zck8372x39spgcdsl4-demo","","x")],[],[],"","",[],[])`,
      /hash 'x' but no hash algorithm/,
    ],
  ];
  for (const [text, re] of bad) {
    it(`rejects ${JSON.stringify(text.slice(0, 40))}… with ${re}`, () => {
      expect(() => parseDerivation(text, 'fod')).toThrow(DerivationError);
      expect(() => parseDerivation(text, 'fod')).toThrow(re);
    });
  }
  it('rejects non-latin1 input and bad names', () => {
    expect(() => parseDerivation(FOD_TEXT.replace('hello', 'hellő'), 'fod')).toThrow(/beyond latin1/);
    expect(() => parseDerivation(FOD_TEXT, 'a b')).toThrow(/invalid derivation name 'a b'/);
    expect(() => drvNameFromPath('/nix/store/rcz8aqa9lzcygdcn1q53xz03vc3svrcp-fod')).toThrow(/not a derivation path/);
    expect(drvNameFromPath(FOD_PATH)).toBe('fod');
  });
});

/** Instantiate `expr` (a Nix expression as raw bytes) with the real Nix 2.8; returns the .drv paths of its list. */
async function instantiate(file: string, expr: Buffer | string): Promise<string[]> {
  const f = join(tmp.path, file);
  writeFileSync(f, expr);
  const r = await nix28('nix-instantiate', [f]);
  // nix-instantiate prints `<drv>!<output>` when the first output is not `out`
  return r.stdout
    .trim()
    .split('\n')
    .map((l) => l.replace(/!.*$/, ''));
}

const SH = 'builder = "/bin/sh"; system = builtins.currentSystem; PATH = "/usr/bin:/bin";';
const nonce = randomBytes(6).toString('hex');

function exprBytes(): Buffer {
  // Raw bytes inside a Nix string literal: invalid UTF-8, a control char and UTF-8 é; CR and TAB via escapes.
  const raw = Buffer.concat([
    Buffer.from('"raw:'),
    Buffer.from([0xff, 0x80, 0x01, 0x7f, 0xc3, 0xa9]),
    Buffer.from(` q\\" bs\\\\ nl\\n cr\\r tab\\t $out \${"$"}{x}"`),
  ]);
  const text = (s: string) => Buffer.from(s);
  return Buffer.concat([
    text(`let
  nonce = "${nonce}";
  src = builtins.toFile "src.txt" "data \${nonce}\\n";
  fodFlat = derivation { name = "fod-flat"; ${SH} args = [ "-c" "echo hello > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"; };
  fodSha1 = derivation { name = "fod-sha1"; ${SH} args = [ "-c" "echo hello > $out" ];
    outputHashAlgo = "sha1"; outputHash = "f572d396fae9206628714fb2ce00f72e94f2258f"; };
  fodRec = derivation { name = "fod-rec"; ${SH} args = [ "-c" "echo hello > $out" ];
    outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM="; };
  fodRecSha512 = derivation { name = "fod-rec512"; ${SH} args = [ "-c" "mkdir $out" ];
    outputHashMode = "recursive"; outputHash = "sha512-${'A'.repeat(86)}=="; };
  a = derivation { name = "a-\${nonce}"; ${SH} outputs = [ "out" "lib" "dev" ];
    args = [ "-c" "echo a > $out; echo l > $lib; echo d > $dev" ]; inherit src; };
  b = derivation { name = "b"; ${SH} args = [ "-c" "echo \${a.lib} \${fodFlat} > $out" ]; a = a; dev = a.dev; };
  c = derivation { name = "c"; ${SH} outputs = [ "bin" "out" ]; args = [ "-c" "echo \${b} > $out; echo > $bin" ];
    inherit b fodRec fodSha1; };
  weird = derivation { name = "weird"; ${SH}
    args = [ "-c" "echo" "arg with \\"quotes\\" and \\\\ and\\nnewline\\ttab\\rcr" "" ];
    "key with \\"quote\\"" = "v"; empty = ""; number = 42; bool = true; nul = null; list = [ "x" 1 "y\\nz" ];
    v = `),
    raw,
    text(`;
    inherit c; };
  pass = derivation { name = "pass"; ${SH} passAsFile = [ "big" "other" ]; big = "lots of data\\n"; other = "o";
    args = [ "-c" "cat $bigPath > $out" ]; };
  structured = derivation { name = "structured"; ${SH} __structuredAttrs = true; outputs = [ "out" "doc" ];
    requiredSystemFeatures = [ "kvm" "big-parallel" ]; nested = { x = [ 1 2 { y = "z"; } ]; s = "é\\"\\n"; };
    args = [ "-c" "true" ]; };
  features = derivation { name = "features"; ${SH} requiredSystemFeatures = [ "kvm" "nixos-test" ]; };
in [ fodFlat fodSha1 fodRec fodRecSha512 a b c weird pass structured features ]
`),
  ]);
}

describe('against nix-instantiate (Nix 2.8)', () => {
  let paths: string[] = [];
  let show: Record<string, { outputs: Record<string, { path?: string; hashAlgo?: string; hash?: string }> }> = {};

  beforeAll(async () => {
    paths = await instantiate('all.nix', exprBytes());
    const r = await nix28('nix', ['show-derivation', ...paths]);
    show = JSON.parse(r.stdout);
  });

  it('instantiated the test expressions', () => {
    expect(paths).toHaveLength(11);
  });

  it('parses every .drv and prints it back byte for byte', () => {
    for (const p of paths) {
      const text = readDrv(p);
      const drv = parseDerivation(text, drvNameFromPath(p));
      expect(printDerivation(drv), p).toBe(text);
    }
    // the weird one really contains the bytes we meant
    const weird = loadDrv(paths[7]!);
    const v = Buffer.from(weird.env.get('v')!, 'latin1');
    expect(v.subarray(0, 11)).toEqual(Buffer.from([0x72, 0x61, 0x77, 0x3a, 0xff, 0x80, 0x01, 0x7f, 0xc3, 0xa9, 0x20]));
    expect(weird.env.get('v')).toContain(` q" bs\\ nl\n cr\r tab\t $out \${x}`);
    expect(weird.args).toEqual(['-c', 'echo', 'arg with "quotes" and \\ and\nnewline\ttab\rcr', '']);
    expect(weird.env.get('key with "quote"')).toBe('v');
    expect(weird.env.get('list')).toBe('x 1 y\nz');
    expect(weird.env.get('bool')).toBe('1');
    expect(weird.env.get('nul')).toBe('');
    expect(readFileSync(paths[7]!).includes(Buffer.from('\\r'))).toBe(true);
  });

  it('computes the .drv path of every derivation', () => {
    for (const p of paths) expect(derivationPath(loadDrv(p))).toBe(p);
  });

  it('computes every output path like Nix (fixed, multi-output, chains through unmasked input hashes)', () => {
    const cache = new Map();
    for (const p of paths) {
      const drv = loadDrv(p);
      const ours = computeOutputPaths(drv, loadDrv, '/nix/store', cache);
      const theirs = new Map(Object.entries(show[p]!.outputs).map(([o, v]) => [o, v.path!]));
      expect(ours, p).toEqual(theirs);
      for (const [o, out] of drv.outputs) expect(out.path).toBe(ours.get(o));
    }
  });

  it('classifies outputs and reads fixed-output hashes', () => {
    const [fodFlat, fodSha1, fodRec, fodRec512, a, , c, , , structured] = paths.map(loadDrv);
    for (const d of [fodFlat!, fodSha1!, fodRec!, fodRec512!]) {
      expect(isFixedOutput(d)).toBe(true);
      expect(isContentAddressed(d)).toBe(true);
      expect(isSandboxed(d)).toBe(false);
      const o = d.outputs.get('out')!;
      expect(show[derivationPath(d)]!.outputs.out!.hashAlgo).toBe(o.methodAlgo);
      expect(show[derivationPath(d)]!.outputs.out!.hash).toBe(o.hash);
    }
    expect(fixedOutputCa(fodFlat!)!.method).toBe('flat');
    expect(fixedOutputCa(fodRec!)).toEqual({
      method: 'recursive',
      hash: Hash.parse('1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13', 'sha256'),
    });
    expect(fodRec512!.outputs.get('out')!.methodAlgo).toBe('r:sha512');
    for (const d of [a!, c!, structured!]) {
      expect(derivationKind(d)).toBe('inputAddressed');
      expect(isFixedOutput(d)).toBe(false);
      expect(isSandboxed(d)).toBe(true);
      expect(fixedOutputCa(d)).toBeUndefined();
    }
  });

  it('reads requiredSystemFeatures and structured attrs', () => {
    const [structured, features] = [paths[9]!, paths[10]!].map(loadDrv);
    expect(requiredSystemFeatures(features!)).toEqual(['kvm', 'nixos-test']);
    expect(requiredSystemFeatures(structured!)).toEqual(['big-parallel', 'kvm']);
    const attrs = new DerivationAttrs(structured!);
    expect(attrs.structured!.nested).toEqual({ x: [1, 2, { y: 'z' }], s: 'é"\n' });
    expect(attrs.getStrings('outputs')).toEqual(['out', 'doc']);
    expect(() => attrs.getString('nested')).toThrow(/must be a string/);
    expect(requiredSystemFeatures(loadDrv(paths[4]!))).toEqual([]);
    const pass = new DerivationAttrs(loadDrv(paths[8]!));
    expect(pass.structured).toBeUndefined();
    expect(pass.getStrings('passAsFile')).toEqual(['big', 'other']);
    const weird = new DerivationAttrs(loadDrv(paths[7]!));
    expect(weird.getBool('bool')).toBe(true);
    expect(weird.getBool('empty', true)).toBe(false);
    expect(weird.getBool('absent', true)).toBe(true);
    const env = (e: Record<string, string>): BasicDerivation => ({
      name: 'x',
      outputs: new Map([
        ['out', { path: '/nix/store/2llmmjm433f590zck8372x39spgcdsl4-demo', methodAlgo: '', hash: '' }],
      ]),
      inputSrcs: [],
      platform: '',
      builder: '',
      args: [],
      env: new Map(Object.entries(e)),
    });
    expect(requiredSystemFeatures(env({ requiredSystemFeatures: ' a\tb\n a  ' }))).toEqual(['a', 'b']);
    expect(() => requiredSystemFeatures(env({ __json: '{"requiredSystemFeatures":"kvm"}' }))).toThrow(
      /must be a list of strings/,
    );
    expect(() => requiredSystemFeatures(env({ __json: '{' }))).toThrow(/cannot process __json/);
  });

  it('round-trips the wire form of every derivation', async () => {
    for (const p of paths) {
      const drv = loadDrv(p);
      const basic: BasicDerivation = { ...drv };
      delete (basic as Partial<Derivation>).inputDrvs;
      const bytes = await writeToBuffer((w) => writeBasicDerivation(w, basic));
      const back = await readBasicDerivation(new WireReader(chunked(bytes)), drv.name);
      expect(back).toEqual(basic);
      expect(printDerivation(back)).toBe(printDerivation(basic));
    }
  });
});

describe('experimental output kinds (floating, deferred, impure) against Nix 2.8', () => {
  it('parses, prints and hashes them like Nix, and refuses to invent their output paths', async () => {
    const f = join(tmp.path, 'ca.nix');
    writeFileSync(
      f,
      `let
        fl = derivation { name = "floating-${nonce}"; ${SH} args = ["-c" "echo > $out"]; __contentAddressed = true;
          outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputs = ["out" "dev"]; };
        def = derivation { name = "deferred"; ${SH} args = ["-c" "echo \${fl.dev} > $out"]; };
        imp = derivation { name = "impure"; ${SH} __impure = true; args = ["-c" "echo > $out"]; };
      in [ fl def imp ]`,
    );
    const r = await nix28('nix-instantiate', [f], {
      env: { NIX_CONFIG: 'experimental-features = nix-command ca-derivations impure-derivations\nsubstituters =\n' },
    });
    const [fl, def, imp] = r.stdout
      .trim()
      .split('\n')
      .map((l) => l.replace(/!.*$/, ''));
    const drvs = [fl!, def!, imp!].map(loadDrv);
    for (const [i, p] of [fl!, def!, imp!].entries()) {
      expect(printDerivation(drvs[i]!)).toBe(readDrv(p));
      expect(derivationPath(drvs[i]!)).toBe(p);
    }
    const [floating, deferred, impure] = drvs;
    expect([floating, deferred, impure].map((d) => derivationKind(d!))).toEqual(['floating', 'deferred', 'impure']);
    expect(isContentAddressed(floating!)).toBe(true);
    expect(isSandboxed(impure!)).toBe(false);
    expect(isSandboxed(floating!)).toBe(true);
    for (const d of drvs) {
      expect(() => computeOutputPaths(d, loadDrv), d.name).toThrow(/only known after the build|not known yet/);
      expect(requiredSystemFeatures(d)).toContain('ca-derivations');
    }
    expect(hashDerivationModulo(impure!, true, loadDrv).get('out')).toEqual(sha256('impure'));
    // placeholders Nix wrote into the env and args
    expect(floating!.env.get('out')).toBe(hashPlaceholder('out'));
    expect(floating!.env.get('dev')).toBe(hashPlaceholder('dev'));
    expect(hashPlaceholder('out')).toBe('/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9');
    expect(deferred!.args[1]).toBe(`echo ${unknownCaOutputPlaceholder(fl!, 'dev')} > $out`);
    expect(passAsFileName('foo')).toBe('.attr-1bp7cri8hplaz6hbz0v4f0nl44rl84q1sg25kgwqzipzd1mv89ic');
  });
});

describe('wire form (§6.2)', () => {
  const FOD_WIRE_PATH = '/nix/store/1ijqscvmqb6qqvnh2f9rk95bnd5w2ig8-fod.txt';
  const BB = '/nix/store/ap5lw0pk87zllpr8psdiqgxx50yqpp1h-busybox';
  const H = '5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03';
  const observed = Buffer.concat([
    encodeU64(1),
    ...['out', FOD_WIRE_PATH, 'sha256', H].map((s) => encodeString(s)),
    encodeU64(1),
    encodeString(BB),
    encodeString('x86_64-linux'),
    encodeString(`${BB}/bin/sh`),
    encodeU64(2),
    encodeString('-c'),
    encodeString('echo hello > $out'),
    encodeU64(7),
    ...[
      ['builder', `${BB}/bin/sh`],
      ['name', 'fod.txt'],
      ['out', FOD_WIRE_PATH],
      ['outputHash', H],
      ['outputHashAlgo', 'sha256'],
      ['outputHashMode', 'flat'],
      ['system', 'x86_64-linux'],
    ].flatMap(([k, v]) => [encodeString(k!), encodeString(v!)]),
  ]);

  it('reads the observed fixed-output BasicDerivation and writes it back identically', async () => {
    const drv = await readBasicDerivation(new WireReader(chunked(observed)), 'fod.txt');
    expect(drv.outputs.get('out')).toEqual({ path: FOD_WIRE_PATH, methodAlgo: 'sha256', hash: H });
    expect(drv.inputSrcs).toEqual([BB]);
    expect(drv.args).toEqual(['-c', 'echo hello > $out']);
    expect(drv.env.get('name')).toBe('fod.txt');
    expect(await writeToBuffer((w) => writeBasicDerivation(w, drv))).toEqual(observed);
  });

  it('recomputes a fixed output path instead of trusting the sender', async () => {
    const lying = Buffer.from(observed);
    const at = lying.indexOf('1ijqscvmqb6qqvnh2f9rk95bnd5w2ig8');
    lying.write('00000000000000000000000000000000', at, 'latin1');
    const drv = await readBasicDerivation(new WireReader(chunked(lying)), 'fod.txt');
    expect(drv.outputs.get('out')!.path).toBe(FOD_WIRE_PATH);
  });

  it('keeps arbitrary bytes and bounds lengths and counts', async () => {
    const drv: BasicDerivation = {
      name: 'bytes',
      outputs: new Map([
        ['out', { path: '/nix/store/2llmmjm433f590zck8372x39spgcdsl4-demo', methodAlgo: '', hash: '' }],
      ]),
      inputSrcs: [],
      platform: 'x86_64-linux',
      builder: '/bin/sh',
      args: [Buffer.from([0, 0xff, 0x80, 0x0a]).toString('latin1')],
      env: new Map([[Buffer.from([0xe9]).toString('latin1'), Buffer.from([0xc3, 0xa9, 0]).toString('latin1')]]),
    };
    const bytes = await writeToBuffer((w) => writeBasicDerivation(w, drv));
    expect(bytes.includes(Buffer.from([0, 0xff, 0x80, 0x0a]))).toBe(true);
    expect(await readBasicDerivation(new WireReader(chunked(bytes)), 'bytes')).toEqual(drv);
    // too many outputs
    await expect(readBasicDerivation(new WireReader(chunked(encodeU64(1_000_000))), 'x')).rejects.toThrow(
      /derivation outputs has too many elements/,
    );
    // an env value longer than the reader allows
    const small = new WireReader(chunked(bytes), { maxString: 2 });
    await expect(readBasicDerivation(small, 'bytes')).rejects.toThrow(/too long/);
    // a total size budget
    await expect(readBasicDerivation(new WireReader(chunked(bytes)), 'bytes', { maxBytes: 150 })).rejects.toThrow(
      /too long|larger than 150 bytes/,
    );
    expect(await readBasicDerivation(new WireReader(chunked(bytes)), 'bytes', { maxBytes: bytes.length })).toEqual(drv);
    // truncated
    await expect(readBasicDerivation(new WireReader(chunked(bytes.subarray(0, 100))), 'bytes')).rejects.toThrow(
      /unexpected end of stream/,
    );
    // invalid input source
    const bad = { ...drv, inputSrcs: ['/tmp/x'] };
    const badBytes = await writeToBuffer((w) => writeBasicDerivation(w, bad));
    await expect(readBasicDerivation(new WireReader(chunked(badBytes)), 'bytes')).rejects.toThrow(
      /input source: path '\/tmp\/x' is not in the Nix store/,
    );
  });

  it('is accepted by a real `nix-store --serve --write`, which builds it and reports the DrvOutput ids we compute', async () => {
    // A BasicDerivation as a client sends it: an input-addressed multi-output build with awkward env bytes.
    const [drvPath] = await instantiate(
      'serve.nix',
      `derivation { name = "serve-${nonce}"; ${SH} outputs = [ "out" "doc" ];
         q = "quote\\" backslash\\\\ tab\\t cr\\r é";
         args = [ "-c" "printf %s \\"$q\\" > $out; echo doc > $doc" ]; }`,
    );
    const drv = loadDrv(drvPath!);
    const basic: BasicDerivation = { ...drv };
    delete (basic as Partial<Derivation>).inputDrvs;
    const request = await writeToBuffer((w) => {
      w.u64(0x390c9deb).u64(0x207);
      w.u64(8).string(drvPath!);
      writeBasicDerivation(w, basic);
      w.u64(0).u64(0).u64(0).u64(0).u64(0).u64(0); // BuildOptions, minor 7
    });
    const child = spawn('nix-store', ['--serve', '--write'], { env: nixEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    try {
      child.stdin.write(request);
      const r = new WireReader(child.stdout);
      expect(await r.readU64()).toBe(0x5452eecb);
      await r.readU64();
      const status = await r.readU64();
      const errorMsg = await r.readString();
      expect({ status, errorMsg, stderr: status === 0 ? '' : stderr }).toEqual({ status: 0, errorMsg: '', stderr: '' });
      await r.readU64(); // timesBuilt
      await r.readU64(); // isNonDeterministic
      await r.readU64(); // startTime
      await r.readU64(); // stopTime
      const n = await r.readCount();
      const theirs = new Map<string, string>();
      for (let i = 0; i < n; i++) theirs.set(await r.readString(), await r.readString());
      const outPaths = new Map([...drv.outputs].map(([o, v]) => [o, v.path]));
      expect(theirs).toEqual(builtOutputs(basic, outPaths));
      expect(readFileSync(drv.outputs.get('out')!.path).toString('latin1')).toBe(
        Buffer.from('quote" backslash\\ tab\t cr\r é').toString('latin1'),
      );
    } finally {
      child.stdin.end();
      child.kill();
    }
  });
});

describe('fixed-output checks', () => {
  it('formats hash mismatches like Nix', () => {
    const want = sha256('hello\n');
    const got = sha256('bye\n');
    expect(checkFixedOutputHash('/nix/store/x.drv', { method: 'flat', hash: want }, want)).toBeUndefined();
    expect(checkFixedOutputHash('/nix/store/x.drv', { method: 'flat', hash: want }, got)).toBe(
      `hash mismatch in fixed-output derivation '/nix/store/x.drv':\n  specified: ${want.toSRI()}\n     got:    ${got.toSRI()}`,
    );
    expect(hashMismatchMessage('d', hashBytes('sha1', 'a'), hashBytes('sha1', 'b'))).toMatch(
      /^hash mismatch in fixed-output derivation 'd':\n {2}specified: sha1-.*\n {5}got: {4}sha1-/,
    );
  });

  it('matches the message of a real failing fixed-output build', async () => {
    const [drvPath] = await instantiate(
      'mismatch.nix',
      `derivation { name = "mismatch-${nonce}"; ${SH} args = [ "-c" "echo bye > $out" ];
         outputHashAlgo = "sha256"; outputHash = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"; }`,
    );
    const r = await nix28('nix-store', ['--realise', drvPath!], { allowFail: true });
    expect(r.code).not.toBe(0);
    const drv = loadDrv(drvPath!);
    const msg = checkFixedOutputHash(drvPath!, fixedOutputCa(drv)!, sha256('bye\n'))!;
    // Nix prints it as `error: <msg>` with continuation lines indented by the width of `error: `
    const printed = msg
      .split('\n')
      .map((l, i) => (i === 0 ? `error: ${l}` : `       ${l}`))
      .join('\n');
    expect(r.stderr.replace(/\x1b\[[0-9;]*m/g, '')).toContain(printed);
  });
});

async function writeToBuffer(f: (w: WireWriter) => void): Promise<Buffer> {
  const sink = new PassThrough();
  const chunks: Buffer[] = [];
  sink.on('data', (c: Buffer) => chunks.push(c));
  const w = new WireWriter(sink);
  f(w);
  await w.flush();
  return Buffer.concat(chunks);
}

/** Feed a buffer in small irregular chunks. */
async function* chunked(b: Buffer): AsyncGenerator<Buffer> {
  for (let i = 0; i < b.length; ) {
    const n = 1 + Math.floor(Math.random() * 50);
    yield b.subarray(i, i + n);
    i += n;
  }
}
