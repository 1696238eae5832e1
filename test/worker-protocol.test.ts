/**
 * The worker protocol at the byte level, driving `runWorker` over in-memory streams with a real store: handshake bytes
 * per client version, error encodings, recoverable and fatal failures (truncated frames, unknown opcodes, invalid
 * store paths, over-long strings), uploads and queries with NARs and path infos made by the real Nix 2.8, activities
 * of a build, and sessions that do not disturb each other.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Builder, BuildRequest, BuildResult } from '../src/build.js';
import { Hash } from '../src/hash.js';
import { silentLogger } from '../src/logger.js';
import { newSessionId, type Session } from '../src/session.js';
import { Store } from '../src/store.js';
import { encodeString, encodeU64, WireReader, WireWriter } from '../src/wire.js';
import {
  NIX_VERSION_STRING,
  runWorker,
  STDERR_ERROR,
  STDERR_LAST,
  STDERR_NEXT,
  STDERR_RESULT,
  STDERR_START_ACTIVITY,
  STDERR_STOP_ACTIVITY,
  WORKER_MAGIC_1,
  WORKER_MAGIC_2,
  type WorkerStats,
} from '../src/worker-protocol.js';
import { tempDir } from './helpers/exec.js';
import { nix28 } from './helpers/nix.js';
import { addFile, type NixPathInfo, nixAdd, nixDump, nixPathInfo, uniqueTag } from './helpers/store-fixtures.js';

let work: { path: string; cleanup: () => void };
let store: Store;
/** Builds requested from the fake builder (the real one is exercised end to end in e2e-ssh-ng). */
const buildRequests: BuildRequest[] = [];
let nextBuild: (req: BuildRequest) => Promise<BuildResult> = async () => result(0);

function result(status: number, errorMsg = ''): BuildResult {
  return {
    status,
    errorMsg,
    timesBuilt: status === 0 ? 1 : 0,
    isNonDeterministic: false,
    startTime: 1000,
    stopTime: 1010,
    builtOutputs: new Map(),
  };
}

const fakeBuilder = {
  build: async (req: BuildRequest) => {
    buildRequests.push(req);
    return nextBuild(req);
  },
} as unknown as Builder;

interface Fixture {
  info: NixPathInfo;
  nar: Buffer;
}
let A: Fixture;
let B: Fixture;
let tag: string;

beforeAll(async () => {
  work = tempDir('buildbox-worker-');
  store = Store.open({ stateDir: join(work.path, 'state'), persist: false, trustedPublicKeys: [] });
  tag = uniqueTag();
  const a = await addFile(work.path, 'a.txt', `worker a ${tag}\n`);
  A = { info: await nixPathInfo(a), nar: await nixDump(a) };
  // B refers to A: a text file made by builtins.toFile mentioning A.
  const b = JSON.parse(
    (
      await nix28('nix-instantiate', [
        '--eval',
        '--read-write-mode',
        '-E',
        `builtins.toFile "b-${tag}" "uses \${builtins.storePath ${a}}"`,
      ])
    ).stdout,
  ) as string;
  B = { info: await nixPathInfo(b), nar: await nixDump(b) };
});

afterAll(() => {
  store?.close();
  work?.cleanup();
});

// ---------------------------------------------------------------------------------------------------------------
// A hand-driven client

interface Messages {
  next: string[];
  activities: Array<{ id: bigint; level: number; type: number; text: string; fields: Array<number | string> }>;
  results: Array<{ id: bigint; type: number; fields: Array<number | string> }>;
  stopped: bigint[];
  error?: string;
}

class Client {
  readonly input = new PassThrough();
  readonly output = new PassThrough();
  readonly r: WireReader;
  readonly w: WireWriter;
  readonly stats: WorkerStats = { operations: 0, bytesIn: 0, bytesOut: 0, clientVersion: 0 };
  readonly done: Promise<number>;
  readonly abort = new AbortController();
  minor = 0;

  constructor(readonly user = 'alice') {
    const session: Session = {
      id: newSessionId(),
      user,
      store,
      builder: fakeBuilder,
      logger: silentLogger(),
      signal: this.abort.signal,
    };
    this.r = new WireReader(this.output);
    this.w = new WireWriter(this.input);
    this.done = runWorker(session, { input: this.input, output: this.output }, this.stats).finally(() =>
      this.output.end(),
    );
  }

  async handshake(version = 0x126): Promise<{ serverVersion: number; nixVersion?: string; trusted?: number }> {
    this.w.u64(WORKER_MAGIC_1).u64(version);
    await this.w.flush();
    expect(await this.r.readU64()).toBe(WORKER_MAGIC_2);
    const serverVersion = await this.r.readU64();
    this.minor = Math.min(version, serverVersion) & 0xff;
    if (this.minor >= 38) {
      this.w.strings(['some-future-feature']);
      await this.w.flush();
      expect(await this.r.readStrings()).toEqual([]);
    }
    if (this.minor >= 14) this.w.u64(0);
    if (this.minor >= 11) this.w.u64(0);
    await this.w.flush();
    const out: { serverVersion: number; nixVersion?: string; trusted?: number } = { serverVersion };
    if (this.minor >= 33) out.nixVersion = await this.r.readString();
    if (this.minor >= 35) out.trusted = await this.r.readU64();
    expect(await this.r.readU64()).toBe(STDERR_LAST);
    return out;
  }

  /** Read stderr messages up to STDERR_LAST (ok) or STDERR_ERROR. */
  async messages(): Promise<Messages> {
    const m: Messages = { next: [], activities: [], results: [], stopped: [] };
    const fields = async () => {
      const n = await this.r.readU64();
      const out: Array<number | string> = [];
      for (let i = 0; i < n; i++) {
        const kind = await this.r.readU64();
        out.push(kind === 0 ? await this.r.readU64() : await this.r.readString());
      }
      return out;
    };
    for (;;) {
      const tag = await this.r.readU64();
      switch (tag) {
        case STDERR_LAST:
          return m;
        case STDERR_NEXT:
          m.next.push(await this.r.readString());
          break;
        case STDERR_START_ACTIVITY: {
          const id = await this.r.readBigU64();
          const level = await this.r.readU64();
          const type = await this.r.readU64();
          const text = await this.r.readString();
          const f = await fields();
          expect(await this.r.readU64()).toBe(0);
          m.activities.push({ id, level, type, text, fields: f });
          break;
        }
        case STDERR_RESULT: {
          const id = await this.r.readBigU64();
          const type = await this.r.readU64();
          m.results.push({ id, type, fields: await fields() });
          break;
        }
        case STDERR_STOP_ACTIVITY:
          m.stopped.push(await this.r.readBigU64());
          break;
        case STDERR_ERROR:
          if (this.minor >= 26) {
            expect(await this.r.readString()).toBe('Error');
            expect(await this.r.readU64()).toBe(0);
            expect(await this.r.readString()).toBe('Error');
            m.error = await this.r.readString();
            expect(await this.r.readU64()).toBe(0);
            expect(await this.r.readU64()).toBe(0);
          } else {
            m.error = await this.r.readString();
            expect(await this.r.readU64()).toBe(1);
          }
          return m;
        default:
          throw new Error(`unexpected stderr tag 0x${tag.toString(16)}`);
      }
    }
  }

  /** Expect success (STDERR_LAST) with no error. */
  async ok(): Promise<Messages> {
    const m = await this.messages();
    expect(m.error).toBeUndefined();
    return m;
  }

  async failed(): Promise<string> {
    const m = await this.messages();
    expect(m.error).toBeDefined();
    return m.error!;
  }

  /** Everything the server writes from now on, until it closes. */
  async rest(): Promise<Buffer> {
    const parts: Buffer[] = [];
    while (!(await this.r.atEof())) parts.push(Buffer.from(await this.r.readSome(1 << 20)));
    return Buffer.concat(parts);
  }

  close(): Promise<number> {
    this.input.end();
    return this.done;
  }

  writeInfo(info: NixPathInfo): this {
    this.w
      .string(info.path)
      .string(info.deriver ?? '')
      .string(Hash.parseAnyPrefixed(info.narHash).toBase16())
      .strings([...info.references].sort())
      .u64(info.registrationTime ?? 0)
      .u64(info.narSize)
      .u64(0)
      .strings([])
      .string(info.ca ?? '');
    return this;
  }

  /** `data` as a framed stream in frames of `frame` bytes, with the terminator. */
  framed(data: Buffer, frame = 1000): this {
    for (let i = 0; i < data.length; i += frame) {
      const c = data.subarray(i, i + frame);
      this.w.u64(c.length).raw(Buffer.from(c));
    }
    this.w.u64(0);
    return this;
  }

  async addToStoreNar(f: Fixture): Promise<Messages> {
    this.w.u64(39);
    this.writeInfo(f.info);
    this.w.u64(0).u64(0);
    this.framed(f.nar);
    await this.w.flush();
    return this.messages();
  }

  async isValid(path: string): Promise<boolean> {
    this.w.u64(1).string(path);
    await this.w.flush();
    await this.ok();
    return this.r.readBool();
  }
}

async function connected(version = 0x126, user = 'alice'): Promise<Client> {
  const c = new Client(user);
  await c.handshake(version);
  return c;
}

function u64s(...vs: number[]): Buffer {
  return Buffer.concat(vs.map((v) => encodeU64(v)));
}

function structuredError(msg: string): Buffer {
  return Buffer.concat([
    u64s(STDERR_ERROR),
    encodeString('Error'),
    u64s(0),
    encodeString('Error'),
    encodeString(msg),
    u64s(0, 0),
  ]);
}

// ---------------------------------------------------------------------------------------------------------------

describe('handshake', () => {
  const cases: Array<[string, number, Buffer]> = [
    [
      '1.38 (Nix 2.24+): features, version string, trusted flag 2',
      0x126,
      Buffer.concat([u64s(WORKER_MAGIC_2, 0x126, 0), encodeString(NIX_VERSION_STRING), u64s(2, STDERR_LAST)]),
    ],
    [
      '1.37 (Nix 2.20): no feature exchange',
      0x125,
      Buffer.concat([u64s(WORKER_MAGIC_2, 0x126), encodeString(NIX_VERSION_STRING), u64s(2, STDERR_LAST)]),
    ],
    [
      '1.35 (Nix 2.15, Lix): trusted flag',
      0x123,
      Buffer.concat([u64s(WORKER_MAGIC_2, 0x126), encodeString(NIX_VERSION_STRING), u64s(2, STDERR_LAST)]),
    ],
    [
      '1.34 (Nix 2.8): version string, no trusted flag',
      0x122,
      Buffer.concat([u64s(WORKER_MAGIC_2, 0x126), encodeString(NIX_VERSION_STRING), u64s(STDERR_LAST)]),
    ],
    ['1.32 (Nix 2.4): no version string', 0x120, u64s(WORKER_MAGIC_2, 0x126, STDERR_LAST)],
  ];
  it.each(cases)('%s', async (_name, version, expected) => {
    const c = new Client();
    // Nix ≥ 2.23 sends magic and version together, then the rest once it has the server's version.
    c.w.u64(WORKER_MAGIC_1).u64(version);
    await c.w.flush();
    const minor = version & 0xff;
    if (minor >= 38) c.w.strings([]);
    c.w.u64(0).u64(0);
    await c.w.flush();
    c.input.end();
    expect(await c.done).toBe(0);
    expect((await c.rest()).toString('hex')).toBe(expected.toString('hex'));
    expect(c.stats.clientVersion).toBe(version);
  });

  it('reports the version string and not-trusted to the client', async () => {
    const c = new Client();
    const h = await c.handshake(0x126);
    expect(h).toEqual({ serverVersion: 0x126, nixVersion: NIX_VERSION_STRING, trusted: 2 });
    expect(NIX_VERSION_STRING).toMatch(/^\d+\.\d+\.\d+ \(buildbox /);
    expect(await c.close()).toBe(0);
  });

  it('reads a non-zero cpu affinity word', async () => {
    const c = new Client();
    c.w.u64(WORKER_MAGIC_1).u64(0x122);
    await c.w.flush();
    c.w.u64(1).u64(3).u64(0); // affinity set, cpu 3, reserveSpace
    await c.w.flush();
    expect(await c.r.readU64()).toBe(WORKER_MAGIC_2);
    await c.r.readU64();
    expect(await c.r.readString()).toBe(NIX_VERSION_STRING);
    expect(await c.r.readU64()).toBe(STDERR_LAST);
    expect(await c.isValid(A.info.path)).toBe(false);
    expect(await c.close()).toBe(0);
  });

  it('ends the session on a wrong magic or a foreign major version', async () => {
    const bad = new Client();
    bad.w.u64(0x12345678);
    await bad.w.flush();
    expect(await bad.done).toBe(1);
    expect((await bad.rest()).length).toBe(0);

    const v2 = new Client();
    v2.w.u64(WORKER_MAGIC_1).u64(0x207);
    await v2.w.flush();
    expect(await v2.done).toBe(1);
  });
});

describe('errors', () => {
  it('refuses an invalid store path with a structured error and ends the session', async () => {
    const c = await connected(0x126);
    c.w.u64(1).string('/tmp/evil');
    await c.w.flush();
    const rest = await c.rest();
    // 80 bytes before the path: magic, version, one feature, cpu affinity, reserveSpace, op.
    const msg = "IsValidPath: path '/tmp/evil' is not in the Nix store /nix/store (at byte 80)";
    expect(rest.toString('hex')).toBe(structuredError(msg).toString('hex'));
    expect(await c.done).toBe(1);
  });

  it('uses the old error form for clients before 1.26', async () => {
    const c = await connected(0x119);
    c.w.u64(1).string('/nix/store/not-a-hash');
    await c.w.flush();
    const err = await c.failed();
    expect(err).toMatch(/^IsValidPath: '\/nix\/store\/not-a-hash' is not a valid store path/);
    expect(await c.done).toBe(1);
  });

  it.each([
    [99, 'buildbox does not implement worker operation 99 (unknown)'],
    [12, 'buildbox does not implement worker operation 12 (AddIndirectRoot)'],
    [20, 'buildbox does not implement worker operation 20 (CollectGarbage)'],
    [24, 'worker operation 24 (QueryFailedPaths) was removed from Nix'],
  ])('answers opcode %i with a clear error and closes, never hangs', async (op, msg) => {
    const c = await connected(0x122);
    c.w.u64(op).u64(123456); // arguments the server cannot know the shape of
    await c.w.flush();
    expect(await c.failed()).toBe(msg);
    expect(await c.done).toBe(1);
  });

  it('refuses an over-long string before reading it', async () => {
    const c = await connected(0x126);
    c.w.u64(1).u64(2 ** 40); // a 1 TiB "path", and no data follows
    await c.w.flush();
    const err = await c.failed();
    expect(err).toBe('IsValidPath: store path is too long (1099511627776 bytes, at most 4096 allowed) (at byte 80)');
    expect(await c.done).toBe(1);
  });

  it('ends the session on a truncated framed upload, and the store keeps nothing', async () => {
    const c = await connected(0x126);
    c.w.u64(39);
    c.writeInfo(A.info);
    c.w.u64(0).u64(0);
    c.w.u64(A.nar.length).raw(A.nar.subarray(0, 40)); // the frame promises more than comes
    await c.w.flush();
    c.input.end();
    const err = await c.failed();
    expect(err).toMatch(/unexpected end of stream while reading frame/);
    expect(await c.done).toBe(1);
    expect(store.isValidPath('alice', A.info.path)).toBe(false);
  });

  it('ends the session on a frame longer than allowed', async () => {
    const c = await connected(0x126);
    c.w
      .u64(44)
      .u64(0)
      .u64(0)
      .u64(2 ** 40);
    await c.w.flush();
    expect(await c.failed()).toMatch(/frame too large \(1099511627776 bytes/);
    expect(await c.done).toBe(1);
  });

  it('keeps the session after a failure inside an operation (bad NAR hash), draining the frames', async () => {
    const c = await connected(0x126);
    const lying = { ...A.info, narHash: `sha256:${'0'.repeat(52)}` };
    c.w.u64(39);
    c.writeInfo(lying);
    c.w.u64(0).u64(0);
    c.framed(A.nar, 16);
    await c.w.flush();
    expect(await c.failed()).toMatch(/hash mismatch importing path/);
    // Still in sync: the next operation works.
    expect(await c.isValid(A.info.path)).toBe(false);
    c.w.u64(38).string(B.info.path);
    await c.w.flush();
    expect(await c.failed()).toBe(`path '${B.info.path}' is not valid`);
    expect(await c.isValid(B.info.path)).toBe(false);
    expect(await c.close()).toBe(0);
  });

  it('does not let a broken session disturb another one', async () => {
    const good = await connected(0x126, 'bob');
    const bad = await connected(0x126, 'bob');
    good.w.u64(44).u64(0).u64(0);
    // Start an upload on the good session, break the bad one in the middle of it, then finish the upload.
    const payload = Buffer.concat([u64s(1), infoBytes(A.info), A.nar]);
    good.w.u64(100).raw(payload.subarray(0, 100));
    await good.w.flush();
    bad.w.u64(200);
    await bad.w.flush();
    expect(await bad.failed()).toBe('buildbox does not implement worker operation 200 (unknown)');
    expect(await bad.done).toBe(1);
    good.framed(payload.subarray(100));
    await good.w.flush();
    await good.ok();
    expect(await good.isValid(A.info.path)).toBe(true);
    expect(await good.close()).toBe(0);
  });
});

function infoBytes(info: NixPathInfo): Buffer {
  const w = [
    encodeString(info.path),
    encodeString(info.deriver ?? ''),
    encodeString(Hash.parseAnyPrefixed(info.narHash).toBase16()),
    encodeU64(info.references.length),
    ...[...info.references].sort().map((r) => encodeString(r)),
    encodeU64(info.registrationTime ?? 0),
    encodeU64(info.narSize),
    encodeU64(0),
    encodeU64(0),
    encodeString(info.ca ?? ''),
  ];
  return Buffer.concat(w);
}

describe('uploads and queries with Nix 2.8 fixtures', () => {
  it('AddMultipleToStore, then path info, NAR and hash-part queries answer from the user view', async () => {
    const c = await connected(0x126, 'carol');
    const payload = Buffer.concat([u64s(2), infoBytes(A.info), A.nar, infoBytes(B.info), B.nar]);
    c.w.u64(44).u64(0).u64(0);
    c.framed(payload, 4096);
    await c.w.flush();
    await c.ok();

    c.w
      .u64(31)
      .strings([A.info.path, B.info.path, `${A.info.path}x`])
      .u64(0);
    await c.w.flush();
    await c.ok();
    expect(await c.r.readStrings()).toEqual([A.info.path, B.info.path]);

    c.w.u64(26).string(B.info.path);
    await c.w.flush();
    await c.ok();
    expect(await c.r.readBool()).toBe(true);
    expect(await c.r.readString()).toBe(''); // deriver
    expect(await c.r.readString()).toBe(Hash.parseAnyPrefixed(B.info.narHash).toBase16());
    expect(await c.r.readStrings()).toEqual([A.info.path]);
    await c.r.readU64(); // registration time
    expect(await c.r.readU64()).toBe(B.info.narSize);
    expect(await c.r.readBool()).toBe(false); // not ultimate
    expect(await c.r.readStrings()).toEqual([]);
    expect(await c.r.readString()).toBe(B.info.ca);

    c.w.u64(38).string(B.info.path);
    await c.w.flush();
    await c.ok();
    expect((await c.r.readExact(B.nar.length)).equals(B.nar)).toBe(true);

    c.w.u64(29).string(A.info.path.slice(11, 43));
    await c.w.flush();
    await c.ok();
    expect(await c.r.readString()).toBe(A.info.path);

    c.w.u64(6).string(A.info.path); // QueryReferrers
    await c.w.flush();
    await c.ok();
    expect(await c.r.readStrings()).toEqual([B.info.path]);

    // Another user sees none of it.
    const d = await connected(0x122, 'dave');
    d.w.u64(26).string(B.info.path);
    await d.w.flush();
    await d.ok();
    expect(await d.r.readBool()).toBe(false);
    d.w.u64(29).string(A.info.path.slice(11, 43));
    await d.w.flush();
    await d.ok();
    expect(await d.r.readString()).toBe('');
    expect(await d.close()).toBe(0);
    expect(await c.close()).toBe(0);
  });

  it('AddToStore computes the same paths as nix-store --add, --add-fixed [--recursive] and builtins.toFile', async () => {
    const dir = join(work.path, `ats-${tag}`);
    mkdirSync(join(dir, 'tree', 'sub'), { recursive: true });
    writeFileSync(join(dir, 'tree', 'sub', 'f'), `tree ${tag}\n`);
    writeFileSync(join(dir, 'flat.txt'), `flat ${tag}\n`);
    const treePath = await nixAdd(join(dir, 'tree'));
    const flatPath = (await nix28('nix-store', ['--add-fixed', 'sha256', join(dir, 'flat.txt')])).stdout.trim();
    const textPath = JSON.parse(
      (
        await nix28('nix-instantiate', [
          '--eval',
          '--read-write-mode',
          '-E',
          `builtins.toFile "t-${tag}" "text ${tag}"`,
        ])
      ).stdout,
    ) as string;

    const c = await connected(0x126, 'erin');
    const addToStore = async (name: string, method: string, refs: string[], data: Buffer) => {
      c.w.u64(7).string(name).string(method).strings(refs).u64(0);
      c.framed(data, 7);
      await c.w.flush();
      await c.ok();
      const path = await c.r.readString();
      await c.r.readString(); // deriver
      const narHash = await c.r.readString();
      await c.r.readStrings();
      await c.r.readU64();
      await c.r.readU64();
      await c.r.readBool();
      await c.r.readStrings();
      const ca = await c.r.readString();
      return { path, narHash, ca };
    };
    const tree = await addToStore('tree', 'fixed:r:sha256', [], await nixDump(treePath));
    expect(tree.path).toBe(treePath);
    expect(tree.narHash).toBe(Hash.parseAnyPrefixed((await nixPathInfo(treePath)).narHash).toBase16());
    const rsha1Path = (
      await nix28('nix-store', ['--add-fixed', '--recursive', 'sha1', join(dir, 'tree')])
    ).stdout.trim();
    const rsha1 = await addToStore('tree', 'fixed:r:sha1', [], await nixDump(treePath));
    expect(rsha1.path).toBe(rsha1Path);
    expect(rsha1.ca).toBe((await nixPathInfo(rsha1Path)).ca);
    const flat = await addToStore('flat.txt', 'fixed:sha256', [], Buffer.from(`flat ${tag}\n`));
    expect(flat.path).toBe(flatPath);
    expect(flat.ca).toBe((await nixPathInfo(flatPath)).ca);
    const text = await addToStore(`t-${tag}`, 'text:sha256', [], Buffer.from(`text ${tag}`));
    expect(text.path).toBe(textPath);
    // The uploads are real store objects: the NAR comes back as Nix dumps it.
    c.w.u64(38).string(treePath);
    await c.w.flush();
    await c.ok();
    const nar = await nixDump(treePath);
    expect((await c.r.readExact(nar.length)).equals(nar)).toBe(true);
    expect(await c.close()).toBe(0);
  });

  it('reads SetOptions fully, answers the trivial operations, refuses AddSignatures and AddBuildLog politely', async () => {
    const c = await connected(0x122, 'alice');
    c.w.u64(19).u64(0).u64(1).u64(0).u64(3).u64(8).u64(60).u64(1).u64(7).u64(0).u64(0).u64(4).u64(1);
    c.w.u64(3).string('build-timeout').string('120').string('substituters').string('http://evil').string('sandbox');
    c.w.string('false');
    await c.w.flush();
    await c.ok();

    c.w.u64(13); // SyncWithGC
    await c.w.flush();
    await c.ok();
    expect(await c.r.readU64()).toBe(1);

    c.w.u64(43).string(`sha256:${'a'.repeat(64)}!out`); // QueryRealisation
    await c.w.flush();
    await c.ok();
    expect(await c.r.readStrings()).toEqual([]);

    c.w.u64(30).u64(1).string(A.info.path).string(''); // QuerySubstitutablePathInfos
    await c.w.flush();
    await c.ok();
    expect(await c.r.readU64()).toBe(0);

    c.w.u64(37).string(A.info.path).strings(['cache.example.org-1:AAAA']);
    await c.w.flush();
    expect(await c.failed()).toMatch(/^buildbox does not add signatures/);

    c.w.u64(45).string(`${'a'.repeat(32)}-x.drv`);
    c.framed(Buffer.from('some log\n'.repeat(1000)), 100);
    await c.w.flush();
    expect(await c.failed()).toMatch(/does not keep build logs/);

    c.w.u64(10).string(B.info.path); // EnsurePath of a path alice does not have
    await c.w.flush();
    expect(await c.failed()).toMatch(/is not valid on the box, and buildbox does not substitute/);

    expect(await c.isValid(B.info.path)).toBe(false);
    expect(await c.close()).toBe(0);
  });
});

describe('BuildDerivation', () => {
  const drvPath = '/nix/store/5g0ibvwlgjyig4n7xybl3c2my6n4mh87-logger.drv';
  const outPath = '/nix/store/d894agb08mb9dgdq1yfzgwfz8a3g8r3l-logger';
  const send = async (c: Client) => {
    c.w.u64(36).string(drvPath);
    c.w.u64(1).string('out').string(outPath).string('').string('');
    c.w.strings([]).string('x86_64-linux').string('/bin/sh').strings(['-c', 'echo hi']);
    c.w.u64(2).string('out').string(outPath).string('system').string('x86_64-linux');
    c.w.u64(0);
    await c.w.flush();
  };

  it('streams the build log as an activity with one result per line (≥ 1.20) and returns the BuildResult', async () => {
    nextBuild = async (req) => {
      req.log(Buffer.from('line-one\nline-'));
      req.log(Buffer.from('two\npartial'));
      req.notice('waiting for a build slot');
      const r = result(0);
      r.builtOutputs.set('sha256:abc!out', '{"x":1}');
      return r;
    };
    for (const version of [0x126, 0x122]) {
      buildRequests.length = 0;
      const c = await connected(version);
      await send(c);
      const m = await c.ok();
      expect(buildRequests).toHaveLength(1);
      expect(buildRequests[0]!.verified).toBe(false);
      expect(buildRequests[0]!.drv.outputs.get('out')!.path).toBe(outPath);
      expect(m.activities).toEqual([
        { id: m.activities[0]!.id, level: 3, type: 105, text: `building '${drvPath}'`, fields: [drvPath, '', 1, 1] },
      ]);
      const id = m.activities[0]!.id;
      expect(m.results).toEqual([
        { id, type: 101, fields: ['line-one'] },
        { id, type: 101, fields: ['line-two'] },
        { id, type: 101, fields: ['partial'] },
      ]);
      expect(m.next).toEqual(['buildbox: waiting for a build slot\n']);
      expect(m.stopped).toEqual([id]);
      expect(await c.r.readU64()).toBe(0);
      expect(await c.r.readString()).toBe('');
      expect(await c.r.readU64()).toBe(1); // timesBuilt
      expect(await c.r.readBool()).toBe(false);
      expect(await c.r.readU64()).toBe(1000);
      expect(await c.r.readU64()).toBe(1010);
      if (version >= 0x125) expect([await c.r.readU64(), await c.r.readU64()]).toEqual([0, 0]); // no CPU times
      expect(await c.r.readU64()).toBe(1);
      expect([await c.r.readString(), await c.r.readString()]).toEqual(['sha256:abc!out', '{"x":1}']);
      expect(await c.close()).toBe(0);
    }
  });

  it('sends plain log lines to clients before 1.20 and the short BuildResult', async () => {
    nextBuild = async (req) => {
      req.log(Buffer.from('old-style\n'));
      return result(3, 'builder failed with exit code 1');
    };
    const c = await connected(0x113);
    await send(c);
    const m = await c.ok();
    expect(m.activities).toEqual([]);
    expect(m.next).toEqual([`building '${drvPath}'\n`, 'old-style\n']);
    expect(await c.r.readU64()).toBe(3);
    expect(await c.r.readString()).toBe('builder failed with exit code 1');
    expect(await c.isValid(A.info.path)).toBe(false);
    expect(await c.close()).toBe(0);
  });

  it('refuses repair and check modes (no client is trusted) and keeps the session', async () => {
    buildRequests.length = 0;
    const c = await connected(0x126);
    c.w
      .u64(9)
      .strings([`${drvPath}!out`])
      .u64(1);
    await c.w.flush();
    expect(await c.failed()).toMatch(/^repairing builds is not allowed on buildbox/);
    expect(buildRequests).toHaveLength(0);
    expect(await c.close()).toBe(0);
  });
});
