/**
 * A hand-driven serve-protocol client over the real OpenSSH client, for sending exactly the bytes a test wants
 * (garbage, unknown commands, lying NAR hashes, a cut connection) to the box.
 */
import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import { WireReader, WireWriter } from '../../src/wire.js';

export interface RawSession {
  child: ChildProcessWithoutNullStreams;
  r: WireReader;
  w: WireWriter;
  stderr(): string;
  /** Resolves with the exit code once ssh exits. */
  exited: Promise<number>;
  kill(): void;
}

export function openRaw(sshConfig: string, user: string, command: string): RawSession {
  const child = spawn('ssh', ['-F', sshConfig, `${user}@box`, command], { stdio: ['pipe', 'pipe', 'pipe'] });
  const err: Buffer[] = [];
  child.stderr.on('data', (d: Buffer) => err.push(d));
  child.stdin.on('error', () => {});
  const exited = new Promise<number>((resolve) => child.on('close', (code) => resolve(code ?? 255)));
  return {
    child,
    r: new WireReader(child.stdout),
    w: new WireWriter(child.stdin),
    stderr: () => Buffer.concat(err).toString(),
    exited,
    kill: () => child.kill('SIGKILL'),
  };
}

export async function serveHandshake(s: RawSession): Promise<number> {
  s.w.u64(0x390c9deb).u64(0x207);
  await s.w.flush();
  const magic = await s.r.readU64();
  if (magic !== 0x5452eecb) throw new Error(`bad server magic 0x${magic.toString(16)}`);
  return s.r.readU64();
}
