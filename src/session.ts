/**
 * What a protocol handler knows about its caller, whichever front door the connection came through (the built-in
 * SSH server or the OpenSSH forced command). Handlers get their store view, builder and logger from here.
 */
import { randomBytes } from 'node:crypto';
import type { Readable, Writable } from 'node:stream';
import type { Logger } from 'pino';
import type { Builder } from './build.js';
import type { Store } from './store.js';

export interface Session {
  /** Unique id, also the holder name of this session's temporary GC roots. */
  readonly id: string;
  /** Registry user name: the view of the store this session sees. */
  readonly user: string;
  readonly store: Store;
  readonly builder: Builder;
  readonly logger: Logger;
  /** Aborted when the client goes away: cancels queued and running builds. */
  readonly signal: AbortSignal;
}

/** A command to run for an authenticated user, as every front door hands it to the dispatcher. */
export interface CommandRequest {
  user: string;
  /** `SHA256:…` of the key the user authenticated with ('' when the front door does not know it). */
  keyFingerprint: string;
  /** The command line the client asked to exec, e.g. `nix-store --serve --write`. */
  command: string;
  remoteAddress?: string;
  stdin: Readable;
  stdout: Writable;
  stderr: Writable;
  /** Aborted when the client goes away (channel, connection or socket closed). */
  signal: AbortSignal;
}

export function newSessionId(): string {
  return `s-${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
}

/** Exit command lines we accept and which protocol they select. */
export type ProtocolRequest =
  | { protocol: 'serve'; write: boolean }
  | { protocol: 'worker' }
  | { protocol: 'info' }
  | { protocol: 'unknown'; command: string };

/**
 * Parse the command a client asked to run. Nix sends `nix-store --serve --write` (ssh://) or `nix-daemon --stdio`
 * (ssh-ng://), possibly with a full path to the program, `--store X`, and the extra trust flags of newer daemons.
 */
export function parseCommand(command: string): ProtocolRequest {
  const argv = command
    .trim()
    .split(/\s+/)
    .filter((a) => a !== '' && a !== '--');
  const prog = (argv[0] ?? '').split('/').pop() ?? '';
  const args = argv.slice(1);
  const knownArgs = (allowed: Set<string>, withValue: Set<string>): boolean => {
    for (let i = 0; i < args.length; i++) {
      const a = args[i]!;
      if (withValue.has(a)) {
        i++;
        continue;
      }
      if (!allowed.has(a)) return false;
    }
    return true;
  };
  if (prog === 'nix-store' && args.includes('--serve')) {
    if (knownArgs(new Set(['--serve', '--write']), new Set(['--store']))) {
      return { protocol: 'serve', write: args.includes('--write') };
    }
  }
  if (prog === 'nix-daemon' && args.includes('--stdio')) {
    const flags = new Set(['--stdio', '--force-trusted', '--force-untrusted', '--default-trust', '--process-ops']);
    if (knownArgs(flags, new Set(['--store']))) return { protocol: 'worker' };
  }
  if (prog === 'nix' && args[0] === 'daemon' && args.includes('--stdio')) return { protocol: 'worker' };
  // The box describing itself (systems, features, host key) as JSON, for `buildbox client-config --host` and `doctor`.
  if (prog === 'buildbox-info' && args.length === 0) return { protocol: 'info' };
  return { protocol: 'unknown', command };
}

export const UNKNOWN_COMMAND_MESSAGE =
  'buildbox only speaks the Nix remote-store protocols; try `nix store ping --store ssh://USER@HOST` ' +
  'or add the box to your builders (`buildbox client-config` prints the settings)';
