/**
 * The built-in SSH front door (ssh2): public-key authentication against the users registry (the SSH user name is the
 * registry name), exec requests only. No passwords, no shells, no forwarding. Each exec request is handed to the
 * shared command dispatcher with the channel as its byte streams.
 */
import type { AddressInfo, Socket } from 'node:net';
import type { Logger } from 'pino';
import ssh2, { type Connection } from 'ssh2';
import { fingerprintOfBlob, type HostKey } from './host-key.js';
import type { CommandRequest } from './session.js';

const { Server, utils } = ssh2; // CommonJS module

export interface SshServerOptions {
  hostKey: HostKey;
  listen: string;
  port: number;
  /** Is this key allowed to log in as this user? Called for every attempt, so registry changes apply at once. */
  isAuthorized(user: string, keyAlgo: string, keyBlob: Buffer): boolean;
  /** Run a command; resolves with its exit status. */
  exec(req: CommandRequest): Promise<number>;
  authTimeoutMs: number;
  maxConnections: number;
  logger: Logger;
}

export interface SshServerHandle {
  port: number;
  address: string;
  connections(): number;
  close(): Promise<void>;
}

export async function startSshServer(opts: SshServerOptions): Promise<SshServerHandle> {
  const clients = new Set<Connection>();
  const server = new Server({ hostKeys: [opts.hostKey.privateKey], ident: 'buildbox' }, (client, info) => {
    handleConnection(client, info.ip, opts, clients);
  });
  server.maxConnections = opts.maxConnections;
  // ssh2's Server wraps a net.Server; listen through it.
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.listen, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (e: Error) => opts.logger.error({ err: e.message }, 'ssh server error'));
  const addr = server.address() as AddressInfo;
  return {
    port: addr.port,
    address: addr.address,
    connections: () => clients.size,
    close: () =>
      new Promise<void>((resolve) => {
        for (const c of clients) c.end();
        server.close(() => resolve());
        setTimeout(() => {
          for (const c of clients) (c as unknown as { _sock?: { destroy(): void } })._sock?.destroy();
        }, 1000).unref();
      }),
  };
}

/**
 * The connection's TCP socket: no Nagle delay (the protocols are request/response: a small reply must not wait for
 * the ACK of an earlier packet, such as a window adjustment, which the client may delay by 40 ms), and the SSH packets
 * written in one tick go out in one system call. ssh2 writes every packet (at most 32 KiB of payload) on its own: a
 * 1 MiB NAR chunk would otherwise be 32 writes.
 */
function tuneSocket(client: Connection): void {
  const sock = (client as unknown as { _sock?: Socket })._sock;
  if (!sock || typeof sock.cork !== 'function') return;
  sock.setNoDelay(true);
  const write = sock.write;
  let corked = false;
  const uncork = () => {
    corked = false;
    sock.uncork();
  };
  sock.write = function (this: Socket, ...args: unknown[]) {
    if (!corked) {
      corked = true;
      sock.cork();
      process.nextTick(uncork);
    }
    return (write as (...a: unknown[]) => boolean).apply(this, args);
  } as Socket['write'];
}

function handleConnection(client: Connection, ip: string, opts: SshServerOptions, clients: Set<Connection>): void {
  clients.add(client);
  tuneSocket(client);
  const conn = new AbortController();
  let user = '';
  let keyFingerprint = '';
  let authenticated = false;
  const authTimer = setTimeout(() => {
    if (!authenticated) {
      opts.logger.info({ ip }, 'connection dropped: no authentication within the timeout');
      client.end();
    }
  }, opts.authTimeoutMs);
  authTimer.unref();

  client.on('authentication', (ctx) => {
    if (ctx.method !== 'publickey') {
      ctx.reject(['publickey']);
      return;
    }
    const blob = ctx.key.data;
    if (!opts.isAuthorized(ctx.username, ctx.key.algo, blob)) {
      opts.logger.info({ ip, user: ctx.username, key: fingerprintOfBlob(blob) }, 'authentication refused');
      ctx.reject(['publickey']);
      return;
    }
    if (!ctx.signature) {
      ctx.accept(); // the client is only asking whether this key would do
      return;
    }
    const pub = utils.parseKey(`${ctx.key.algo} ${blob.toString('base64')}`);
    if (pub instanceof Error || Array.isArray(pub) || ctx.blob === undefined) {
      ctx.reject(['publickey']);
      return;
    }
    if (pub.verify(ctx.blob, ctx.signature, ctx.hashAlgo) !== true) {
      ctx.reject(['publickey']);
      return;
    }
    user = ctx.username;
    keyFingerprint = fingerprintOfBlob(blob);
    ctx.accept();
  });

  client.on('ready', () => {
    authenticated = true;
    clearTimeout(authTimer);
    client.on('session', (acceptSession) => {
      const session = acceptSession();
      session.on('exec', (accept, _reject, info) => {
        const channel = accept();
        const chan = new AbortController();
        const abort = () => chan.abort();
        conn.signal.addEventListener('abort', abort, { once: true });
        channel.on('close', abort);
        opts
          .exec({
            user,
            keyFingerprint,
            command: info.command,
            remoteAddress: ip,
            stdin: channel,
            stdout: channel,
            stderr: channel.stderr,
            signal: chan.signal,
          })
          .catch((e: unknown) => {
            opts.logger.error({ err: (e as Error).message }, 'command failed unexpectedly');
            return 1;
          })
          .then((code) => {
            conn.signal.removeEventListener('abort', abort);
            if (chan.signal.aborted) return;
            // Exit status first, then EOF and close, so the client sees the status before the channel closes.
            channel.exit(code);
            channel.end();
          });
      });
      const refuse = (what: string) => (_accept: unknown, reject?: () => void) => {
        opts.logger.info({ user, what }, 'refused session request');
        reject?.();
      };
      session.on('shell', refuse('shell'));
      session.on('subsystem', refuse('subsystem'));
      session.on('auth-agent', refuse('agent forwarding'));
      session.on('x11', refuse('x11 forwarding'));
      session.on('pty', (accept) => accept?.()); // harmless; commands still need to be protocol commands
      session.on('env', (accept) => accept?.());
    });
    client.on('tcpip', (_accept, reject) => reject());
    client.on('request', (_accept, reject) => reject?.());
  });

  client.on('error', (e: Error) => {
    opts.logger.debug({ ip, err: e.message }, 'connection error');
  });
  client.on('close', () => {
    clearTimeout(authTimer);
    clients.delete(client);
    conn.abort();
  });
}
