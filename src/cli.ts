#!/usr/bin/env -S node --max-semi-space-size=4
/**
 * The `buildbox` command. Each sub-command lives in its own module under src/commands/ and is loaded lazily, so
 * `buildbox --help` stays fast and a broken optional part never stops the others.
 *
 * The interpreter line caps V8's young generation at 4 MiB semi-spaces (it grows to 16 MiB ones under sustained
 * traffic otherwise): the box's memory is mostly Buffers outside the V8 heap, and a serving box then peaks ~15 MiB
 * lower with no loss of throughput (bench P1/P5; 1 MiB takes ~10 MiB more off but costs ~15 % more CPU per GB
 * downloaded). scripts/start.sh passes the same flag.
 */
import { Command, CommanderError } from 'commander';
import { registerClientCommands } from './commands/client.js';
import { registerServeCommands } from './commands/serve.js';
import { registerUsersCommands } from './commands/users.js';
import { VERSION } from './version.js';

export class UsageError extends Error {
  constructor(
    message: string,
    readonly exitCode = 2,
  ) {
    super(message);
    this.name = 'UsageError';
  }
}

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('buildbox')
    .description(
      'A community Nix remote build box: ssh:// and ssh-ng:// builders, per-user store views, no trusted users',
    )
    .version(VERSION, '-V, --version')
    .showHelpAfterError();
  registerServeCommands(program);
  registerUsersCommands(program);
  registerClientCommands(program);
  return program;
}

async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  program.exitOverride();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode;
    if (e instanceof UsageError) {
      process.stderr.write(`buildbox: ${e.message}\n`);
      return e.exitCode;
    }
    const msg = e instanceof Error ? e.message : String(e);
    process.stderr.write(`buildbox: error: ${msg}\n`);
    if (process.env.BUILDBOX_DEBUG) process.stderr.write(`${(e as Error).stack ?? ''}\n`);
    return 1;
  }
}

const isMain = process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href;
if (isMain || process.argv[1]?.endsWith('/cli.js')) {
  main(process.argv).then((code) => {
    process.exitCode = code;
  });
}
