import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Hash } from '../src/hash.js';
import {
  fingerprintPathInfo,
  loadPublicKey,
  loadSecretKey,
  makeKeyRing,
  PublicKey,
  SecretKey,
  SigningError,
  savePublicKey,
  saveSecretKey,
  signPathInfo,
  validPathInfoSignatures,
  verifyPathInfoSignatures,
  verifySignature,
} from '../src/signing.js';
import { tempDir } from './helpers/exec.js';
import { nix28 } from './helpers/nix.js';
import {
  addFile,
  buildWithRefs,
  type NixPathInfo,
  nixAcceptsSignature,
  nixPathInfo,
  uniqueTag,
} from './helpers/store-fixtures.js';

function toSignable(info: NixPathInfo, sigs: string[] = info.signatures ?? []) {
  return {
    path: info.path,
    narHash: Hash.parseAnyPrefixed(info.narHash),
    narSize: info.narSize,
    references: info.references,
    sigs,
  };
}

let dir: { path: string; cleanup: () => void };
let nixSecret: string;
let nixPublic: string;
let leaf: string;
let built: string;

beforeAll(async () => {
  dir = tempDir('buildbox-signing-');
  const name = `nixkey-${uniqueTag()}-1`;
  await nix28('nix-store', ['--generate-binary-cache-key', name, join(dir.path, 'nix.sec'), join(dir.path, 'nix.pub')]);
  nixSecret = join(dir.path, 'nix.sec');
  nixPublic = join(dir.path, 'nix.pub');
  leaf = await addFile(dir.path, 'leaf.txt', `leaf ${uniqueTag()}\n`);
  // A non-content-addressed path with a reference, so the fingerprint's reference list is exercised.
  built = await buildWithRefs(dir.path, 'signed-out', `built ${uniqueTag()}`, [leaf]);
});

afterAll(() => dir?.cleanup());

describe('keys', () => {
  it('reads keys made by nix-store --generate-binary-cache-key and derives the same public key', () => {
    const sk = loadSecretKey(nixSecret);
    const pk = loadPublicKey(nixPublic);
    expect(sk.publicKey.toString()).toBe(pk.toString());
    expect(sk.toString()).toBe(readFileSync(nixSecret, 'utf8').trim());
    expect(sk.name).toMatch(/^nixkey-/);
  });

  it('generates keys in the Nix format and saves the secret with mode 0600', () => {
    const sk = SecretKey.generate('box-1');
    expect(sk.toString()).toMatch(/^box-1:[A-Za-z0-9+/]{86}==$/);
    expect(sk.publicKey.toString()).toMatch(/^box-1:[A-Za-z0-9+/]{43}=$/);
    const f = join(dir.path, 'ours.sec');
    saveSecretKey(f, sk);
    expect(statSync(f).mode & 0o777).toBe(0o600);
    expect(loadSecretKey(f).toString()).toBe(sk.toString());
    const pf = join(dir.path, 'ours.pub');
    savePublicKey(pf, sk.publicKey);
    expect(loadPublicKey(pf).toString()).toBe(sk.publicKey.toString());
    // Two generated keys differ.
    expect(SecretKey.generate('box-1').toString()).not.toBe(sk.toString());
  });

  it('refuses malformed keys with clear errors', () => {
    const sk = SecretKey.generate('k');
    expect(() => SecretKey.parse('nocolon')).toThrow(SigningError);
    expect(() => SecretKey.parse(':AAAA')).toThrow(/<name>:<base64>/);
    expect(() => SecretKey.parse('k:AAAA')).toThrow(/not valid base64 of 64 bytes/);
    expect(() => PublicKey.parse(sk.toString())).toThrow(/not valid base64 of 32 bytes/);
    expect(() => PublicKey.parse('k:!!!!')).toThrow(SigningError);
    // A secret key whose public half belongs to another seed.
    const other = SecretKey.generate('k');
    const bytes = Buffer.from(sk.toString().slice(2), 'base64');
    Buffer.from(other.publicKey.toString().slice(2), 'base64').copy(bytes, 32);
    expect(() => SecretKey.parse(`k:${bytes.toString('base64')}`)).toThrow(/public half does not match/);
    expect(() => loadSecretKey(join(dir.path, 'missing'))).toThrow(/cannot read secret key file/);
  });
});

describe('path-info signatures', () => {
  it('computes the fingerprint of spec §5.6', () => {
    const narHash = Hash.parseAny('1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13', 'sha256');
    const fp = fingerprintPathInfo({
      path: '/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt',
      narHash,
      narSize: 120,
      references: ['/nix/store/zzzz', '/nix/store/aaaa'],
    });
    expect(fp).toBe(
      `1;/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt;sha256:${narHash.toNix32()};120;/nix/store/aaaa,/nix/store/zzzz`,
    );
    expect(() => fingerprintPathInfo({ path: '/nix/store/x', narHash, narSize: 0, references: [] })).toThrow(
      /size is not known/,
    );
  });

  it('accepts a signature made by `nix store sign`, and only for the signed info and key', async () => {
    await nix28('nix', ['store', 'sign', '--key-file', nixSecret, built]);
    const info = await nixPathInfo(built, true);
    const pk = loadPublicKey(nixPublic);
    const nixSig = info.signatures!.find((s) => s.startsWith(`${pk.name}:`))!;
    expect(nixSig).toBeDefined();
    expect(info.references).toEqual([leaf]);

    expect(verifyPathInfoSignatures(toSignable(info, [nixSig]), [pk])).toBe(true);
    expect(verifyPathInfoSignatures(toSignable(info, [nixSig]), [pk.toString()])).toBe(true);
    // Ed25519 is deterministic: our signature of the same fingerprint with the same key is byte-identical.
    expect(signPathInfo(toSignable(info), loadSecretKey(nixSecret))).toBe(nixSig);

    // Not trusted: another key, or the right name with another key's bytes.
    const other = SecretKey.generate(pk.name);
    expect(verifyPathInfoSignatures(toSignable(info, [nixSig]), [other.publicKey])).toBe(false);
    expect(verifyPathInfoSignatures(toSignable(info, [nixSig]), [])).toBe(false);
    // Any changed field invalidates it.
    const s = toSignable(info, [nixSig]);
    expect(verifyPathInfoSignatures({ ...s, narSize: s.narSize + 1 }, [pk])).toBe(false);
    expect(verifyPathInfoSignatures({ ...s, references: [] }, [pk])).toBe(false);
    expect(verifyPathInfoSignatures({ ...s, path: leaf }, [pk])).toBe(false);
    const flipped = Buffer.from(s.narHash.digest);
    flipped[0] = flipped[0]! ^ 1;
    expect(verifyPathInfoSignatures({ ...s, narHash: new Hash('sha256', flipped) }, [pk])).toBe(false);
    // Garbage signatures are invalid, never errors; valid ones are picked out of a mixed list.
    const junk = ['', 'nocolon', `${pk.name}:`, `${pk.name}:!!!`, `${pk.name}:AAAA`, `unknown:${nixSig.split(':')[1]}`];
    for (const j of junk) expect(verifyPathInfoSignatures(toSignable(info, [j]), [pk])).toBe(false);
    expect(validPathInfoSignatures(toSignable(info, [...junk, nixSig, nixSig]), makeKeyRing([pk]))).toEqual([nixSig]);
  });

  it('makes signatures that `nix store verify` accepts, and Nix rejects forged ones', async () => {
    const sk = SecretKey.generate(`box-${uniqueTag()}-1`);
    const info = await nixPathInfo(built);
    const sig = signPathInfo(toSignable(info), sk);
    expect(verifySignature(fingerprintPathInfo(toSignable(info)), sig, [sk.publicKey])).toBe(true);
    expect(await nixAcceptsSignature(dir.path, built, sig, sk.publicKey.toString())).toBe(true);
    // Signed by a different key under the same name: Nix refuses it (so the check above can fail).
    const forger = SecretKey.generate(sk.name);
    const forged = signPathInfo(toSignable(info), forger);
    expect(await nixAcceptsSignature(dir.path, built, forged, sk.publicKey.toString())).toBe(false);
    // Nix signs with our generated key file and we verify its signature.
    const f = join(dir.path, 'gen.sec');
    saveSecretKey(f, sk);
    await nix28('nix', ['store', 'sign', '--key-file', f, leaf]);
    const leafInfo = await nixPathInfo(leaf, true);
    const leafSig = leafInfo.signatures!.find((s) => s.startsWith(`${sk.name}:`))!;
    expect(leafSig).toBe(signPathInfo(toSignable(leafInfo), sk));
    expect(verifyPathInfoSignatures(toSignable(leafInfo, [leafSig]), [sk.publicKey])).toBe(true);
  });

  it('reads a key file with a trailing newline', () => {
    const sk = SecretKey.generate('nl-1');
    const f = join(dir.path, 'nl.sec');
    writeFileSync(f, `${sk.toString()}\n`);
    expect(loadSecretKey(f).toString()).toBe(sk.toString());
  });
});
