/**
 * The OpenSSH front door's plumbing: a unix socket in the box's state directory (`<stateDir>/session.sock`) that
 * `buildbox session USER` — the forced command sshd runs after it authenticated a key from `buildbox
 * authorized-keys USER` — connects to, so that OpenSSH sessions reach the very same command dispatcher as the
 * built-in SSH server.
 *
 * Who may connect is decided by the socket's permissions (mode 0660, group of the box process unless a group is
 * given): the accounts sshd runs the forced command as must be members of that group, and nobody else. The user named
 * in the header is believed, exactly like sshd's forced command line is: the accounts that can reach the socket must be
 * ones that can only ever run `buildbox session` (every key `restrict`ed with the forced command). See docs/joining.md.
 *
 * Protocol (version 1), one connection per session:
 *
 *   client → server  one header line: UTF-8 JSON, at most 64 KiB, ending in "\n":
 *                      {"buildbox-session":1,"user":"alice","command":"<SSH_ORIGINAL_COMMAND>",
 *                       "keyFingerprint":"SHA256:…","remoteAddress":"203.0.113.7"}
 *                    then the session's stdin, raw; the client half-closes (FIN) at stdin's end.
 *   server → client  frames: u8 type, u32 big-endian payload length (≤ 1 MiB), payload:
 *                      1 = stdout bytes, 2 = stderr bytes, 3 = exit (payload: u32 big-endian status),
 *                      4 = keep-alive (empty; ignored by the client);
 *                    the exit frame is the last one, then the server closes.
 *
 * A client that vanishes looks, on a unix socket, exactly like one that half-closed at the end of its stdin. So once
 * stdin has ended the server sends a keep-alive frame every second while the session runs: writing to a socket
 * whose peer is gone fails at once (EPIPE), which aborts the session (and cancels its builds).
 *
 * Backpressure holds both ways: the handler's stdin stops reading the socket while its consumer is behind, and the
 * handler's stdout/stderr writes complete only when the socket took them. The session's abort signal fires when
 * the client's connection goes away.
 */
import { chmodSync, chownSync, lstatSync, unlinkSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { Readable, Writable } from 'node:stream';
import type { Logger } from 'pino';
import type { CommandRequest } from './session.js';

export const SESSION_SOCKET_FILE = 'session.sock';
export const SESSION_PROTOCOL_VERSION = 1;

export const FRAME_STDOUT = 1;
export const FRAME_STDERR = 2;
export const FRAME_EXIT = 3;
export const FRAME_KEEPALIVE = 4;
/** How often the server checks, after stdin's end, that the client is still there. */
export const KEEPALIVE_MS = 1000;
/** Largest frame payload either side produces or accepts. */
export const MAX_FRAME = 1024 * 1024;
/** Largest header line the server accepts. */
export const MAX_HEADER = 64 * 1024;
const MAX_COMMAND = 8192;
/** Longest unix socket path Linux accepts (sun_path is 108 bytes with its NUL). */
export const MAX_SOCKET_PATH = 107;

export interface SessionHeader {
  'buildbox-session': number;
  user: string;
  command: string;
  keyFingerprint?: string;
  remoteAddress?: string;
}

/** What the socket hands to the box: the same request every front door makes. */
export type SessionExecRequest = CommandRequest;

export interface SessionSocketOptions {
  /** Permissions of the socket file (default 0660: the box's user and group). */
  mode?: number;
  /** Numeric group to give the socket (the group of the accounts sshd runs the forced command as). */
  gid?: number;
}

export interface SessionSocketHandle {
  path: string;
  /** Sessions currently connected. */
  sessions(): number;
  /** Stop accepting, abort running sessions, remove the socket file. */
  close(): Promise<void>;
}

export class SessionSocketError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SessionSocketError';
  }
}

/** Same rule as the registry's user names (unix login names). */
const USER_RE = /^(?!-)(?![0-9]+$)(?!\.{1,2}$)[A-Za-z0-9._-]{1,32}$/;

export function encodeFrame(type: number, payload: Buffer): Buffer {
  const head = Buffer.allocUnsafe(5);
  head.writeUInt8(type, 0);
  head.writeUInt32BE(payload.length, 1);
  return Buffer.concat([head, payload]);
}

function exitFrame(code: number): Buffer {
  const p = Buffer.allocUnsafe(4);
  p.writeUInt32BE(code >>> 0, 0);
  return encodeFrame(FRAME_EXIT, p);
}

/** Is something listening on this socket path? */
function probe(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function clearStale(path: string): Promise<void> {
  let st: ReturnType<typeof lstatSync>;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) {
    throw new SessionSocketError(`${path} exists and is not a socket; remove it or choose another state directory`);
  }
  if (await probe(path)) {
    throw new SessionSocketError(
      `another box is already serving sessions on ${path}; stop it first (two boxes cannot share a state directory)`,
    );
  }
  unlinkSync(path);
}

/**
 * A Writable whose chunks become frames of one type on the socket. A write completes once the socket accepted it
 * (no `drain` pending), so a slow client slows the handler down instead of filling memory.
 */
class FrameWriter extends Writable {
  constructor(
    private readonly socket: Socket,
    private readonly type: number,
  ) {
    super({ highWaterMark: 64 * 1024 });
  }

  override _write(chunk: Buffer | string, enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    const data = typeof chunk === 'string' ? Buffer.from(chunk, enc) : chunk;
    if (this.socket.destroyed || this.socket.writableEnded) {
      cb(new SessionSocketError('session connection closed'));
      return;
    }
    let ok = true;
    for (let off = 0; off < data.length; off += MAX_FRAME) {
      ok = this.socket.write(encodeFrame(this.type, data.subarray(off, off + MAX_FRAME)));
    }
    if (ok) {
      cb();
      return;
    }
    const done = (err?: Error) => {
      this.socket.off('drain', onDrain);
      this.socket.off('close', onClose);
      cb(err);
    };
    const onDrain = () => done();
    const onClose = () => done(new SessionSocketError('session connection closed'));
    this.socket.on('drain', onDrain);
    this.socket.on('close', onClose);
  }
}

/** Wait until a writable has flushed everything (or died). Never rejects. */
function finished(w: Writable): Promise<void> {
  return new Promise((resolve) => {
    if (w.writableFinished || w.destroyed) {
      resolve();
      return;
    }
    const done = () => {
      w.off('finish', done);
      w.off('close', done);
      w.off('error', done);
      resolve();
    };
    w.on('finish', done);
    w.on('close', done);
    w.on('error', done);
    if (!w.writableEnded) w.end();
  });
}

/** Read the header line; resolves with it and whatever stdin bytes arrived in the same chunks. */
function readHeader(socket: Socket): Promise<{ header: Buffer; rest: Buffer } | undefined> {
  return new Promise((resolve, reject) => {
    let buf: Buffer = Buffer.alloc(0);
    const cleanup = () => {
      socket.off('data', onData);
      socket.off('end', onEnd);
      socket.off('close', onEnd);
      socket.off('error', onEnd);
    };
    const onData = (chunk: Buffer) => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      const nl = buf.indexOf(0x0a);
      if (nl >= 0) {
        cleanup();
        socket.pause();
        resolve({ header: buf.subarray(0, nl), rest: buf.subarray(nl + 1) });
      } else if (buf.length > MAX_HEADER) {
        cleanup();
        socket.pause();
        reject(new SessionSocketError(`session header longer than ${MAX_HEADER} bytes`));
      }
    };
    const onEnd = () => {
      cleanup();
      resolve(undefined);
    };
    socket.on('data', onData);
    socket.on('end', onEnd);
    socket.on('close', onEnd);
    socket.on('error', onEnd);
  });
}

export function parseSessionHeader(line: Buffer): SessionHeader {
  let h: unknown;
  try {
    h = JSON.parse(line.toString('utf8'));
  } catch {
    throw new SessionSocketError('session header is not JSON');
  }
  if (typeof h !== 'object' || h === null || Array.isArray(h))
    throw new SessionSocketError('session header is not a JSON object');
  const o = h as Record<string, unknown>;
  if (o['buildbox-session'] !== SESSION_PROTOCOL_VERSION) {
    throw new SessionSocketError(
      `unsupported session protocol ${JSON.stringify(o['buildbox-session'])} (this box speaks ${SESSION_PROTOCOL_VERSION}); ` +
        'the buildbox running as forced command and the box must be the same version',
    );
  }
  if (typeof o.user !== 'string' || !USER_RE.test(o.user)) {
    throw new SessionSocketError(`invalid user name in session header: ${JSON.stringify(o.user)?.slice(0, 80)}`);
  }
  if (typeof o.command !== 'string' || o.command.length > MAX_COMMAND) {
    throw new SessionSocketError('invalid command in session header');
  }
  const opt = (k: string): string | undefined => {
    const v = o[k];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'string' || v.length > 1024) throw new SessionSocketError(`invalid ${k} in session header`);
    return v;
  };
  const header: SessionHeader = { 'buildbox-session': SESSION_PROTOCOL_VERSION, user: o.user, command: o.command };
  const fp = opt('keyFingerprint');
  const ip = opt('remoteAddress');
  if (fp !== undefined) header.keyFingerprint = fp;
  if (ip !== undefined) header.remoteAddress = ip;
  return header;
}

/**
 * Serve sessions on a unix socket at `path`. A stale socket left by a crashed box is replaced; a live one is an
 * error (two boxes must not share a state directory).
 */
export async function startSessionSocket(
  path: string,
  exec: (req: SessionExecRequest) => Promise<number>,
  logger: Logger,
  opts: SessionSocketOptions = {},
): Promise<SessionSocketHandle> {
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH) {
    throw new SessionSocketError(
      `session socket path ${path} is longer than ${MAX_SOCKET_PATH} bytes (a unix socket limit); use a shorter state directory`,
    );
  }
  await clearStale(path);
  const live = new Set<Socket>();
  const server: Server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => {
    live.add(socket);
    socket.once('close', () => live.delete(socket));
    handle(socket, exec, logger).catch((e: unknown) => {
      logger.error({ err: (e as Error).message }, 'session socket: session failed unexpectedly');
      socket.destroy();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) => {
      reject(new SessionSocketError(`cannot listen on ${path}: ${e.code ?? e.message}`));
    });
    server.listen(path, () => resolve());
  });
  server.on('error', (e: Error) => logger.error({ err: e.message }, 'session socket error'));
  try {
    chmodSync(path, opts.mode ?? 0o660);
    if (opts.gid !== undefined) chownSync(path, -1, opts.gid);
  } catch (e) {
    server.close();
    throw new SessionSocketError(`cannot set permissions of ${path}: ${(e as NodeJS.ErrnoException).code ?? e}`);
  }
  logger.debug({ path }, 'session socket listening');
  let closed = false;
  return {
    path,
    sessions: () => live.size,
    close: () =>
      new Promise<void>((resolve) => {
        if (closed) {
          resolve();
          return;
        }
        closed = true;
        for (const s of live) s.destroy();
        server.close(() => {
          try {
            unlinkSync(path);
          } catch {
            // already gone
          }
          resolve();
        });
      }),
  };
}

async function handle(
  socket: Socket,
  exec: (req: SessionExecRequest) => Promise<number>,
  logger: Logger,
): Promise<void> {
  socket.on('error', (e: Error) => logger.debug({ err: e.message }, 'session socket connection error'));
  const abort = new AbortController();
  socket.once('close', () => abort.abort());
  socket.resume();
  let first: { header: Buffer; rest: Buffer } | undefined;
  let header: SessionHeader;
  try {
    first = await readHeader(socket);
    if (!first) return; // connected and went away: a probe
    header = parseSessionHeader(first.header);
  } catch (e) {
    const msg = (e as Error).message;
    logger.warn({ err: msg }, 'session socket: bad session header');
    socket.write(encodeFrame(FRAME_STDERR, Buffer.from(`buildbox: ${msg}\n`)));
    socket.end(exitFrame(1));
    return;
  }

  // stdin: the rest of the socket, pulled at the handler's pace.
  const stdin = new Readable({
    highWaterMark: 64 * 1024,
    read() {
      socket.resume();
    },
    destroy(err, cb) {
      socket.off('data', onData);
      socket.off('end', onEnd);
      cb(err);
    },
  });
  const onData = (chunk: Buffer) => {
    if (!stdin.push(chunk)) socket.pause();
  };
  let keepalive: NodeJS.Timeout | undefined;
  const onEnd = () => {
    stdin.push(null);
    keepalive = setInterval(() => {
      if (!socket.destroyed && !socket.writableEnded) socket.write(encodeFrame(FRAME_KEEPALIVE, Buffer.alloc(0)));
    }, KEEPALIVE_MS);
  };
  if (first.rest.length > 0) stdin.push(first.rest);
  socket.on('data', onData);
  socket.once('end', onEnd);
  socket.once('close', () => {
    clearInterval(keepalive);
    if (!stdin.readableEnded && !stdin.destroyed) stdin.destroy();
  });
  socket.resume();

  const stdout = new FrameWriter(socket, FRAME_STDOUT);
  const stderr = new FrameWriter(socket, FRAME_STDERR);
  stdout.on('error', () => {});
  stderr.on('error', () => {});
  let code = 1;
  try {
    code = await exec({
      user: header.user,
      keyFingerprint: header.keyFingerprint ?? '',
      command: header.command,
      remoteAddress: header.remoteAddress,
      stdin,
      stdout,
      stderr,
      signal: abort.signal,
    });
  } catch (e) {
    logger.error({ err: (e as Error).message, user: header.user }, 'session failed unexpectedly');
    code = 1;
  }
  // Everything the handler wrote goes out before the exit status.
  await Promise.all([finished(stdout), finished(stderr)]);
  clearInterval(keepalive);
  if (!stdin.destroyed) stdin.destroy();
  if (socket.destroyed || abort.signal.aborted) return;
  socket.end(exitFrame(code));
}

// ---------------------------------------------------------------------------------------------------------------
// Client side: `buildbox session USER`, the forced command.

export interface SessionClientIO {
  stdin: Readable;
  stdout: Writable;
  stderr: Writable;
}

export interface SessionClientMeta {
  keyFingerprint?: string;
  remoteAddress?: string;
}

/** Status the forced command exits with when it cannot reach the box (as ssh does for its own failures). */
export const SESSION_UNREACHABLE = 255;

function writeLine(w: Writable, line: string): Promise<void> {
  return new Promise((resolve) => {
    if (w.destroyed) {
      resolve();
      return;
    }
    w.write(`${line}\n`, () => resolve());
  });
}

/**
 * Connect to the box's session socket as `user`, run `command` (the client's SSH_ORIGINAL_COMMAND) and pipe the
 * given streams through. Resolves with the session's exit status; one clear line on stderr when the box cannot be
 * reached.
 */
export async function runSessionClient(
  socketPath: string,
  user: string,
  command: string,
  io: SessionClientIO,
  meta: SessionClientMeta = {},
): Promise<number> {
  const conn = await new Promise<{ socket: Socket } | { error: NodeJS.ErrnoException }>((resolve) => {
    const s = connect({ path: socketPath, allowHalfOpen: true });
    s.once('connect', () => {
      s.removeAllListeners('error');
      resolve({ socket: s });
    });
    s.once('error', (e: NodeJS.ErrnoException) => resolve({ error: e }));
  });
  if ('error' in conn) {
    const code = conn.error.code;
    const why =
      code === 'ENOENT' || code === 'ECONNREFUSED'
        ? `the build box is not running (nothing listens on ${socketPath}); ask its admin to start it (systemctl start buildbox)`
        : code === 'EACCES' || code === 'EPERM'
          ? `permission denied on ${socketPath}: the account running this forced command must be in the box's group (see docs/joining.md)`
          : `cannot connect to the build box at ${socketPath}: ${code ?? conn.error.message}`;
    await writeLine(io.stderr, `buildbox: ${why}`);
    return SESSION_UNREACHABLE;
  }
  const socket = conn.socket;

  const header: SessionHeader = { 'buildbox-session': SESSION_PROTOCOL_VERSION, user, command };
  if (meta.keyFingerprint) header.keyFingerprint = meta.keyFingerprint;
  if (meta.remoteAddress) header.remoteAddress = meta.remoteAddress;
  socket.write(`${JSON.stringify(header)}\n`);

  return new Promise<number>((resolve) => {
    let settled = false;
    let buf: Buffer = Buffer.alloc(0);
    let stdinDone = false;
    const finish = (code: number, message?: string) => {
      if (settled) return;
      settled = true;
      io.stdin.unpipe(socket);
      io.stdin.off('end', onStdinEnd);
      io.stdin.off('error', onStdinEnd);
      io.stdin.pause();
      socket.removeAllListeners('data');
      socket.destroy();
      const flush = async () => {
        if (message) await writeLine(io.stderr, message);
        // Let what was written drain before the caller exits the process.
        await Promise.all([writeEmpty(io.stdout), writeEmpty(io.stderr)]);
        resolve(code);
      };
      void flush();
    };

    const onStdinEnd = () => {
      if (stdinDone) return;
      stdinDone = true;
      if (!socket.destroyed && !socket.writableEnded) socket.end();
    };
    // pipe() honours the socket's backpressure; at stdin's end, half-close so the handler sees EOF.
    io.stdin.pipe(socket, { end: false });
    io.stdin.once('end', onStdinEnd);
    io.stdin.once('error', onStdinEnd);

    const deliver = (w: Writable, payload: Buffer) => {
      if (w.destroyed) return;
      if (!w.write(payload)) {
        socket.pause();
        w.once('drain', () => socket.resume());
      }
    };

    socket.on('data', (chunk: Buffer) => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      while (buf.length >= 5) {
        const type = buf.readUInt8(0);
        const len = buf.readUInt32BE(1);
        if (len > MAX_FRAME || (type === FRAME_EXIT && len !== 4) || type < FRAME_STDOUT || type > FRAME_KEEPALIVE) {
          finish(SESSION_UNREACHABLE, `buildbox: malformed reply from the box on ${socketPath} (frame type ${type})`);
          return;
        }
        if (buf.length < 5 + len) break;
        const payload = buf.subarray(5, 5 + len);
        buf = buf.subarray(5 + len);
        if (type === FRAME_STDOUT) deliver(io.stdout, payload);
        else if (type === FRAME_STDERR) deliver(io.stderr, payload);
        else if (type === FRAME_KEEPALIVE) continue;
        else {
          finish(payload.readUInt32BE(0));
          return;
        }
      }
    });
    socket.on('error', () => {});
    socket.on('close', () => finish(SESSION_UNREACHABLE, 'buildbox: the box closed the session unexpectedly'));
  });
}

function writeEmpty(w: Writable): Promise<void> {
  return new Promise((resolve) => {
    if (w.destroyed || w.writableEnded) {
      resolve();
      return;
    }
    w.write(Buffer.alloc(0), () => resolve());
  });
}
