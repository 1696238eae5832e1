/**
 * The one place every front door (built-in SSH server, OpenSSH forced command) hands a command to: it picks the
 * protocol the command asks for, runs its handler on the given streams as the given user, and writes the one log
 * line per session (user, key fingerprint, command, duration, bytes in/out, result).
 */
import type { Logger } from 'pino';
import type { Builder } from './build.js';
import { runServe, type ServeStats } from './serve-protocol.js';
import { type CommandRequest, newSessionId, parseCommand, type Session, UNKNOWN_COMMAND_MESSAGE } from './session.js';
import type { Store } from './store.js';
import { runWorker, type WorkerStats } from './worker-protocol.js';

export interface CommandContext {
  store: Store;
  builder: Builder;
  logger: Logger;
  /** The answer to `buildbox-info` for this user (client-config.ts `boxInfo`); absent: the command is refused. */
  info?: (user: string) => unknown;
}

export type { CommandRequest };

export async function runCommand(ctx: CommandContext, req: CommandRequest): Promise<number> {
  const started = Date.now();
  const id = newSessionId();
  const logger = ctx.logger.child({ session: id, user: req.user });
  const parsed = parseCommand(req.command);
  const session: Session = {
    id,
    user: req.user,
    store: ctx.store,
    builder: ctx.builder,
    logger,
    signal: req.signal,
  };
  let code = 1;
  let stats: ServeStats | WorkerStats | undefined;
  try {
    switch (parsed.protocol) {
      case 'serve': {
        const st: ServeStats = { commands: 0, bytesIn: 0, bytesOut: 0, clientVersion: 0 };
        stats = st;
        code = await runServe(session, { input: req.stdin, output: req.stdout, stderr: req.stderr }, parsed, st);
        break;
      }
      case 'worker': {
        const st: WorkerStats = { operations: 0, bytesIn: 0, bytesOut: 0, clientVersion: 0 };
        stats = st;
        code = await runWorker(session, { input: req.stdin, output: req.stdout }, st);
        break;
      }
      case 'info': {
        const info = ctx.info?.(req.user);
        if (info === undefined) {
          if (!req.stderr.destroyed) req.stderr.write(`${UNKNOWN_COMMAND_MESSAGE}\n`);
          code = 1;
          break;
        }
        await new Promise<void>((resolve) => req.stdout.write(`${JSON.stringify(info)}\n`, () => resolve()));
        code = 0;
        break;
      }
      default:
        if (!req.stderr.destroyed) req.stderr.write(`${UNKNOWN_COMMAND_MESSAGE}\n`);
        code = 1;
    }
  } finally {
    ctx.store.releaseTempRoots(id);
    logger.info(
      {
        key: req.keyFingerprint,
        ip: req.remoteAddress,
        command: req.command,
        protocol: parsed.protocol,
        durationMs: Date.now() - started,
        bytesIn: stats?.bytesIn ?? 0,
        bytesOut: stats?.bytesOut ?? 0,
        clientVersion: stats ? `0x${stats.clientVersion.toString(16)}` : undefined,
        result: req.signal.aborted ? 'disconnected' : code === 0 ? 'ok' : 'error',
        exitCode: code,
      },
      'session',
    );
  }
  return code;
}
