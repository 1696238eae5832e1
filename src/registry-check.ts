/**
 * `buildbox users check`: the registry lint for pull-request CI. It parses the registry exactly as the box does
 * (module `registry`) and adds the policy checks: entries in alphabetical order, vouching, unused key files. Every
 * problem is reported, as `file:line:col: message`, or as GitHub annotations when `GITHUB_ACTIONS=true`.
 *
 * Vouching (`vouchedBy = [ "bob" ];`): a voucher that does not exist is always an error. With `--require-vouch`,
 * every entry that is not an admin (`sudo = true`) needs at least one voucher who is an existing `trusted = true`
 * user other than itself, and following vouchers back must reach an admin: a group vouching only for each other,
 * with no admin vouching into it, does not count. (`trusted` itself is no exemption: it is what a new entry claims.)
 *
 * Exit status: 0 clean (warnings allowed unless `--strict`), 1 problems, 2 the registry could not be read.
 */
import {
  analyzeRegistry,
  displayPath,
  type Problem,
  type RegistryAnalysis,
  RegistryReadError,
  sortProblems,
} from './registry.js';

export interface CheckOptions {
  usersFile?: string;
  /** Warnings are errors. */
  strict?: boolean;
  /** Non-admin entries need a trusted voucher (see the module comment). */
  requireVouch?: boolean;
  now?: Date;
}

export interface CheckNote {
  file: string;
  line: number;
  col: number;
  message: string;
}

export interface CheckResult {
  exitCode: 0 | 1 | 2;
  /** Every problem, sorted by file and position; with `strict`, warnings already turned into errors. */
  problems: Problem[];
  /** Things worth knowing that are not problems (keys only an OpenSSH front door can use). */
  notes: CheckNote[];
  analysis?: RegistryAnalysis;
  /** Why the registry could not be read (exit status 2). */
  readError?: string;
  errors: number;
  warnings: number;
}

/** Case-insensitive order, as the community file asks ("0x4A6F" < "aszlig" < "Profpatsch" < "qyliss"). */
export function compareUserNames(a: string, b: string): number {
  const la = a.toLowerCase();
  const lb = b.toLowerCase();
  if (la !== lb) return la < lb ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

export async function checkRegistry(dir: string, opts: CheckOptions = {}): Promise<CheckResult> {
  let analysis: RegistryAnalysis;
  try {
    analysis = await analyzeRegistry(dir, { usersFile: opts.usersFile, now: opts.now });
  } catch (e) {
    if (e instanceof RegistryReadError) {
      return { exitCode: 2, problems: [], notes: [], readError: e.message, errors: 0, warnings: 0 };
    }
    throw e;
  }
  const problems = [...analysis.problems];
  const file = analysis.file;
  const add = (
    span: { line: number; col: number },
    severity: Problem['severity'],
    code: Problem['code'],
    message: string,
  ) => problems.push({ file, line: span.line, col: span.col, severity, code, message });

  // Alphabetical order.
  const entries = analysis.entries;
  for (let i = 1; i < entries.length; i++) {
    const e = entries[i]!;
    if (compareUserNames(entries[i - 1]!.name, e.name) <= 0) continue;
    const before = entries.find((x) => compareUserNames(x.name, e.name) > 0)!;
    add(
      e.nameSpan,
      'warning',
      'order',
      `user ${JSON.stringify(e.name)} is out of alphabetical order: it belongs before ${JSON.stringify(before.name)}`,
    );
  }

  // Vouching.
  const byName = new Map(entries.map((e) => [e.name, e]));
  const boolField = (name: string, field: string): boolean => {
    const v = byName.get(name)?.value;
    if (v?.kind !== 'attrs') return false;
    const f = v.fields.get(field)?.value;
    return f?.kind === 'bool' && f.value;
  };
  const validVouchers = new Map<string, string[]>();
  for (const e of entries) {
    const valid: string[] = [];
    for (const v of e.vouchedBy) {
      if (!byName.has(v.name)) {
        add(v.span, 'error', 'vouch', `unknown voucher ${JSON.stringify(v.name)}: there is no such user`);
        continue;
      }
      if (!opts.requireVouch) continue;
      if (v.name === e.name) {
        add(v.span, 'error', 'vouch', `user ${JSON.stringify(e.name)} cannot vouch for themselves`);
      } else if (!boolField(v.name, 'trusted')) {
        add(v.span, 'error', 'vouch', `voucher ${JSON.stringify(v.name)} is not a trusted user (trusted = true)`);
      } else valid.push(v.name);
    }
    validVouchers.set(e.name, valid);
  }
  if (opts.requireVouch) {
    const admins = entries.filter((e) => boolField(e.name, 'sudo')).map((e) => e.name);
    // Who is reachable from an admin through valid vouches.
    const reached = new Set(admins);
    let grew = true;
    while (grew) {
      grew = false;
      for (const e of entries) {
        if (reached.has(e.name)) continue;
        if ((validVouchers.get(e.name) ?? []).some((v) => reached.has(v))) {
          reached.add(e.name);
          grew = true;
        }
      }
    }
    for (const e of entries) {
      if (reached.has(e.name)) continue;
      const shown = JSON.stringify(e.name);
      if (e.vouchedBy.length === 0) {
        add(
          e.nameSpan,
          'error',
          'vouch',
          `user ${shown} needs a voucher: add vouchedBy = [ "<a trusted user>" ]; (or sudo = true for an admin)`,
        );
      } else if ((validVouchers.get(e.name) ?? []).length === 0) {
        add(e.nameSpan, 'error', 'vouch', `user ${shown} has no valid voucher (a trusted user other than themselves)`);
      } else {
        add(
          e.nameSpan,
          'error',
          'vouch',
          `user ${shown} is vouched for only by users whose own vouching does not lead back to an admin (sudo = true)`,
        );
      }
    }
  }

  if (opts.strict) for (const p of problems) p.severity = 'error';
  sortProblems(problems);

  const notes: CheckNote[] = [];
  for (const u of analysis.users.values()) {
    for (const k of u.unusableKeys) {
      notes.push({
        file: u.keyFile!,
        line: k.line,
        col: k.col,
        message: `user ${JSON.stringify(u.name)}: ${k.unusableReason}`,
      });
    }
  }
  notes.sort((a, b) => (a.file === b.file ? a.line - b.line : a.file < b.file ? -1 : 1));

  const errors = problems.filter((p) => p.severity === 'error').length;
  return {
    exitCode: errors ? 1 : 0,
    problems,
    notes,
    analysis,
    errors,
    warnings: problems.length - errors,
  };
}

function escapeData(s: string): string {
  return s.replace(/%/g, '%25').replace(/\r/g, '%0D').replace(/\n/g, '%0A');
}

function escapeProperty(s: string): string {
  return escapeData(s).replace(/:/g, '%3A').replace(/,/g, '%2C');
}

/** A GitHub Actions workflow command: `::error file=…,line=…,col=…::message`. */
export function githubAnnotation(
  kind: 'error' | 'warning' | 'notice',
  p: { file: string; line: number; col: number; message: string },
  base?: string,
): string {
  const file = escapeProperty(displayPath(p.file, base));
  return `::${kind} file=${file},line=${p.line},col=${p.col}::${escapeData(p.message)}`;
}

export interface RunCheckOptions extends CheckOptions {
  env?: NodeJS.ProcessEnv;
  /** Paths in messages are relative to this (default: GITHUB_WORKSPACE under Actions, else the current directory). */
  base?: string;
  stdout?: (s: string) => void;
  stderr?: (s: string) => void;
}

/** The `users check` command: prints the report and returns the exit status. */
export async function runUsersCheck(dir: string, opts: RunCheckOptions = {}): Promise<number> {
  const env = opts.env ?? process.env;
  const out = opts.stdout ?? ((s: string) => process.stdout.write(s));
  const err = opts.stderr ?? ((s: string) => process.stderr.write(s));
  const gh = env.GITHUB_ACTIONS === 'true';
  const base = opts.base ?? (gh && env.GITHUB_WORKSPACE ? env.GITHUB_WORKSPACE : process.cwd());
  const r = await checkRegistry(dir, opts);
  if (r.exitCode === 2) {
    if (gh) out(`::error::${escapeData(`users check: ${r.readError}`)}\n`);
    err(`users check: ${r.readError}\n`);
    return 2;
  }
  const lines: string[] = [];
  for (const p of r.problems) {
    if (gh) lines.push(githubAnnotation(p.severity, p, base));
    else {
      lines.push(
        `${displayPath(p.file, base)}:${p.line}:${p.col}: ${p.severity === 'warning' ? 'warning: ' : ''}${p.message}`,
      );
    }
  }
  for (const n of r.notes) {
    lines.push(
      gh ? githubAnnotation('notice', n, base) : `${displayPath(n.file, base)}:${n.line}:${n.col}: note: ${n.message}`,
    );
  }
  if (lines.length) out(`${lines.join('\n')}\n`);
  const users = r.analysis?.entries.length ?? 0;
  const plural = (n: number, w: string) => `${n} ${w}${n === 1 ? '' : 's'}`;
  const summary =
    r.errors || r.warnings
      ? `users check: ${plural(r.errors, 'error')}, ${plural(r.warnings, 'warning')} (${plural(users, 'user')})`
      : `users check: ${plural(users, 'user')}, no problems`;
  err(`${summary}\n`);
  return r.exitCode;
}
