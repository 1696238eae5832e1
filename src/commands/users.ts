/**
 * `buildbox users check [REGISTRY_DIR] [--strict] [--require-vouch]`, `buildbox users add NAME --key FILE|-` and
 * `buildbox users remove NAME`. Wire into the program with `registerUsersCommands(program)`.
 */
import { readFile } from 'node:fs/promises';
import type { Command } from 'commander';
import { displayPath } from '../registry.js';
import { runUsersCheck } from '../registry-check.js';
import { addUser, RegistryEditError, removeUser } from '../registry-edit.js';

export interface UsersIo {
  stdout: (s: string) => void;
  stderr: (s: string) => void;
  /** Standard input, for `--key -`. */
  stdin: () => Promise<Buffer>;
  env: NodeJS.ProcessEnv;
}

const defaultIo = (): UsersIo => ({
  stdout: (s) => process.stdout.write(s),
  stderr: (s) => process.stderr.write(s),
  stdin: async () => {
    const chunks: Buffer[] = [];
    for await (const c of process.stdin) chunks.push(c as Buffer);
    return Buffer.concat(chunks);
  },
  env: process.env,
});

function report(io: UsersIo, cmd: string, e: unknown): number {
  if (e instanceof RegistryEditError) {
    io.stderr(`buildbox users ${cmd}: ${e.message}\n${e.details.map((d) => `  ${d}\n`).join('')}`);
    return e.exitCode;
  }
  const err = e as NodeJS.ErrnoException;
  io.stderr(`buildbox users ${cmd}: ${err?.message ?? String(e)}\n`);
  return err?.code === 'ENOENT' || err?.code === 'EACCES' ? 2 : 1;
}

export function registerUsersCommands(program: Command, io: UsersIo = defaultIo()): Command {
  const users = program
    .command('users')
    .description('the users registry (users.nix + keys/): check it, add and remove users');

  users
    .command('check')
    .description('report every problem in a registry (for pull-request CI); exit 0 clean, 1 problems, 2 unreadable')
    .argument('[registry-dir]', 'directory holding users.nix and keys/', '.')
    .option('--strict', 'treat warnings (e.g. entries out of alphabetical order) as errors')
    .option('--require-vouch', 'every non-admin entry needs vouchedBy = [ "<trusted user>" ];')
    .option('--users-file <file>', 'users file inside the registry directory', 'users.nix')
    .action(async (dir: string, opts: { strict?: boolean; requireVouch?: boolean; usersFile: string }) => {
      process.exitCode = await runUsersCheck(dir, {
        strict: opts.strict,
        requireVouch: opts.requireVouch,
        usersFile: opts.usersFile,
        env: io.env,
        stdout: io.stdout,
        stderr: io.stderr,
      });
    });

  users
    .command('add')
    .description('add a user: writes keys/NAME and inserts the entry into users.nix in alphabetical order')
    .argument('<name>', 'user name (the SSH user name clients will use)')
    .requiredOption('--key <file>', 'public key file (authorized_keys lines), or - for standard input')
    .option('--registry <dir>', 'registry directory', '.')
    .option('--users-file <file>', 'users file inside the registry directory', 'users.nix')
    .option('--trusted', 'mark as a vouched-for community member (trusted = true; never Nix trust)')
    .option('--sudo', 'mark as an admin (sudo = true)')
    .option('--vouched-by <names...>', 'existing users vouching for this one')
    .action(
      async (
        name: string,
        opts: {
          key: string;
          registry: string;
          usersFile: string;
          trusted?: boolean;
          sudo?: boolean;
          vouchedBy?: string[];
        },
      ) => {
        try {
          const key = opts.key === '-' ? await io.stdin() : await readFile(opts.key);
          const r = await addUser(opts.registry, name, key, {
            usersFile: opts.usersFile,
            trusted: opts.trusted,
            sudo: opts.sudo,
            vouchedBy: opts.vouchedBy,
            keyLabel: opts.key === '-' ? 'standard input' : opts.key,
          });
          io.stdout(
            `added user ${JSON.stringify(name)}: ${displayPath(r.keyFile)} (${r.fingerprints.join(', ')}), ` +
              `${r.created ? 'created' : 'updated'} ${displayPath(r.usersFile)}\n`,
          );
          for (const n of r.notes) io.stdout(`note: ${n}\n`);
          process.exitCode = 0;
        } catch (e) {
          process.exitCode = report(io, 'add', e);
        }
      },
    );

  users
    .command('remove')
    .description('remove a user: its entry in users.nix and its key file')
    .argument('<name>', 'user name')
    .option('--registry <dir>', 'registry directory', '.')
    .option('--users-file <file>', 'users file inside the registry directory', 'users.nix')
    .action(async (name: string, opts: { registry: string; usersFile: string }) => {
      try {
        const r = await removeUser(opts.registry, name, { usersFile: opts.usersFile });
        io.stdout(
          `removed user ${JSON.stringify(name)} from ${displayPath(r.usersFile)}` +
            `${r.keyFile ? ` and ${displayPath(r.keyFile)}` : ''}\n`,
        );
        process.exitCode = 0;
      } catch (e) {
        process.exitCode = report(io, 'remove', e);
      }
    });

  return users;
}
