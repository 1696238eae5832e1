/**
 * `buildbox users add NAME --key FILE|-` and `users remove NAME`: edit a registry the way a person would, touching
 * only the entry concerned. users.nix is edited as bytes: the new entry is spliced in alphabetical order, in the
 * style of its neighbours (indentation, one line or several, blank lines between entries, attribute-set or list
 * form), and every other byte — comments, layout, odd spacing — stays as it was. Removing an entry takes out its
 * lines (and one blank separator line when that keeps the layout), so add-then-remove gives back the same file.
 *
 * Writes are atomic (temporary file + rename). The key file is written before users.nix and removed after it, so a
 * running box never sees an entry whose key file is missing; if writing users.nix fails, the new key file goes away.
 */
import { randomBytes } from 'node:crypto';
import { constants, mkdir, open, readFile, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { parseAuthorizedKeys } from './authorized-keys.js';
import { type NixAttrs, type NixValue, parseNixData, quoteNixString, renderAttrName } from './nix-data.js';
import { analyzeRegistry, displayPath, formatProblem, type RegistryAnalysis, userNameProblem } from './registry.js';
import { compareUserNames } from './registry-check.js';

/** An edit was refused; nothing was written. */
export class RegistryEditError extends Error {
  constructor(
    message: string,
    readonly details: string[] = [],
    readonly exitCode = 1,
  ) {
    super(message);
    this.name = 'RegistryEditError';
  }
}

export interface EditOptions {
  /** users.nix relative to the registry directory (default `users.nix`). */
  usersFile?: string;
}

export interface AddUserOptions extends EditOptions {
  trusted?: boolean;
  sudo?: boolean;
  vouchedBy?: string[];
}

export interface AddUserResult {
  usersFile: string;
  keyFile: string;
  fingerprints: string[];
  /** Keys accepted but usable only through an OpenSSH front door. */
  notes: string[];
  /** users.nix did not exist and was created. */
  created: boolean;
}

export interface RemoveUserResult {
  usersFile: string;
  /** The key file removed, if any. */
  keyFile?: string;
}

/** Write a file atomically: temporary file in the same directory, fsync, rename. Keeps `mode`. */
export async function writeFileAtomic(path: string, data: Buffer | string, mode = 0o644): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (e) {
    await fh.close().catch(() => {});
    await unlink(tmp).catch(() => {});
    throw e;
  }
  await fh.close();
  try {
    await rename(tmp, path);
  } catch (e) {
    await unlink(tmp).catch(() => {});
    throw e;
  }
  // Make the rename durable too (best effort).
  try {
    const dh = await open(dirname(path), constants.O_RDONLY);
    await dh.sync().catch(() => {});
    await dh.close();
  } catch {
    // not supported here
  }
}

async function analyzeForEdit(dir: string, opts: EditOptions): Promise<RegistryAnalysis> {
  let a: RegistryAnalysis;
  try {
    a = await analyzeRegistry(dir, { usersFile: opts.usersFile, allowMissing: true });
  } catch (e) {
    throw new RegistryEditError((e as Error).message, [], 2);
  }
  const syntax = a.problems.filter((p) => p.code === 'syntax' || p.code === 'structure');
  if (syntax.length) {
    throw new RegistryEditError(
      `${displayPath(a.file)} has errors; fix them first`,
      syntax.map((p) => formatProblem(p)),
    );
  }
  return a;
}

interface Unit {
  name: string;
  start: number;
  end: number;
  /** Only whitespace before it on its line. */
  startsLine: boolean;
  multiline: boolean;
}

const isBlank = (s: string) => /^[ \t\r]*$/.test(s);

class Text {
  constructor(readonly s: string) {}
  lineStart(off: number): number {
    return this.s.lastIndexOf('\n', off - 1) + 1;
  }
  /** Offset of the `\n` ending the line of `off` (or the text length). */
  lineEnd(off: number): number {
    const i = this.s.indexOf('\n', off);
    return i < 0 ? this.s.length : i;
  }
  startsLine(off: number): boolean {
    return isBlank(this.s.slice(this.lineStart(off), off));
  }
  /** Only whitespace or a `#` comment after `off` on its line. */
  endsLine(off: number): boolean {
    return /^[ \t\r]*(#.*)?$/.test(this.s.slice(off, this.lineEnd(off)));
  }
  indentOf(off: number): string {
    return /^[ \t]*/.exec(this.s.slice(this.lineStart(off)))![0];
  }
  /** The line before the one starting at `lineStart`, or undefined at the top. */
  prevLine(lineStart: number): { start: number; end: number; text: string } | undefined {
    if (lineStart === 0) return undefined;
    const end = lineStart - 1;
    const start = this.lineStart(end);
    return { start, end, text: this.s.slice(start, end) };
  }
  nextLine(lineEndNl: number): { start: number; end: number; text: string } | undefined {
    if (lineEndNl >= this.s.length) return undefined;
    const start = lineEndNl + 1;
    const end = this.lineEnd(start);
    return { start, end, text: this.s.slice(start, end) };
  }
}

function unitsOf(top: NixValue, form: 'attrs' | 'list', t: Text): Unit[] {
  const units: Unit[] = [];
  if (form === 'attrs' && top.kind === 'attrs') {
    for (const e of top.entries) {
      const { start, end } = e.span;
      units.push({
        name: e.path[0]!.name,
        start,
        end,
        startsLine: t.startsLine(start),
        multiline: t.s.slice(start, end).includes('\n'),
      });
    }
  } else if (top.kind === 'list') {
    for (const item of top.items) {
      const nameField = item.kind === 'attrs' ? item.fields.get('name')?.value : undefined;
      const { start, end } = item.span;
      units.push({
        name: nameField?.kind === 'string' ? nameField.value : '',
        start,
        end,
        startsLine: t.startsLine(start),
        multiline: t.s.slice(start, end).includes('\n'),
      });
    }
  }
  return units;
}

/** Indentation of the fields inside a multi-line entry, from the entry's own first field. */
function innerIndent(top: NixValue, unit: Unit, t: Text, fallback: string): string {
  let inner: NixAttrs | undefined;
  if (top.kind === 'attrs') {
    const e = top.entries.find((x) => x.span.start === unit.start);
    if (e?.value.kind === 'attrs' && !e.value.synthetic) inner = e.value;
  } else if (top.kind === 'list') {
    const it = top.items.find((x) => x.span.start === unit.start);
    if (it?.kind === 'attrs') inner = it;
  }
  const first = inner?.entries[0];
  if (first && t.startsLine(first.span.start)) return t.indentOf(first.span.start);
  return fallback;
}

function renderFields(name: string, form: 'attrs' | 'list', opts: AddUserOptions): string[] {
  const fields: string[] = [];
  if (form === 'list') fields.push(`name = ${quoteNixString(name)};`);
  if (opts.trusted) fields.push('trusted = true;');
  if (opts.sudo) fields.push('sudo = true;');
  fields.push(`keys = ./keys/${name};`);
  if (opts.vouchedBy?.length) fields.push(`vouchedBy = [ ${opts.vouchedBy.map((v) => quoteNixString(v)).join(' ')} ];`);
  return fields;
}

function renderUnit(
  name: string,
  form: 'attrs' | 'list',
  opts: AddUserOptions,
  style: { multiline: boolean; indent: string; inner: string; nl: string },
): string {
  const fields = renderFields(name, form, opts);
  const head = form === 'attrs' ? `${renderAttrName(name)} = ` : '';
  const tail = form === 'attrs' ? ';' : '';
  if (!style.multiline) return `${head}{ ${fields.join(' ')} }${tail}`;
  return `${head}{${style.nl}${fields.map((f) => `${style.inner}${f}${style.nl}`).join('')}${style.indent}}${tail}`;
}

/**
 * The text of users.nix with a new entry for `name` spliced in. `text` is the file as latin1 (bytes); the result too.
 * Exported for tests; `addUser` is the command.
 */
export function insertUserEntry(text: string, name: string, opts: AddUserOptions = {}, file = 'users.nix'): string {
  const parsed = parseNixData(Buffer.from(text, 'latin1'), file);
  if (parsed.errors.length || !parsed.value) {
    throw new RegistryEditError(
      `${file} has errors; fix them first`,
      parsed.errors.map((e) => e.message),
    );
  }
  const top = parsed.value;
  if (top.kind !== 'attrs' && top.kind !== 'list') {
    throw new RegistryEditError(`${file} must be an attribute set or a list of users`);
  }
  const form = top.kind === 'attrs' ? 'attrs' : 'list';
  const t = new Text(text);
  const nl = text.includes('\r\n') ? '\r\n' : '\n';
  const units = unitsOf(top, form, t);

  if (units.length === 0) {
    // Empty container: `{ }`, `[\n]`, or one holding only comments.
    const open = top.span.start;
    const close = top.span.end - 1;
    const baseIndent = t.indentOf(open);
    const indent = `${baseIndent}  `;
    const entry = renderUnit(name, form, opts, { multiline: true, indent, inner: `${indent}  `, nl });
    const inside = text.slice(open + 1, close);
    if (isBlank(inside.replace(/\n/g, ''))) {
      return `${text.slice(0, open + 1)}${nl}${indent}${entry}${nl}${baseIndent}${text.slice(close)}`;
    }
    // Comments inside: add the entry on its own line just before the closer.
    if (t.startsLine(close)) {
      const ls = t.lineStart(close);
      return `${text.slice(0, ls)}${indent}${entry}${nl}${text.slice(ls)}`;
    }
    return `${text.slice(0, close)}${nl}${indent}${entry}${nl}${baseIndent}${text.slice(close)}`;
  }

  const anchorIdx = units.findIndex((u) => compareUserNames(u.name, name) > 0);
  const before = anchorIdx >= 0;
  const ref = before ? units[anchorIdx]! : units[units.length - 1]!;
  // Blank lines between entries? Look at the gap next to the reference entry.
  const other = before ? (units[anchorIdx - 1] ?? units[anchorIdx + 1]) : units[units.length - 2];
  let blank = false;
  if (other) {
    const [a, b] = other.start < ref.start ? [other, ref] : [ref, other];
    blank = /\n[ \t\r]*\n/.test(text.slice(a.end, b.start));
  }

  if (!ref.startsLine || !t.endsLine(ref.end)) {
    // Entries share lines (`{ a = …; b = …; }`): insert inline.
    const entry = renderUnit(name, form, opts, { multiline: false, indent: '', inner: '', nl });
    if (before) return `${text.slice(0, ref.start)}${entry} ${text.slice(ref.start)}`;
    return `${text.slice(0, ref.end)} ${entry}${text.slice(ref.end)}`;
  }

  const indent = t.indentOf(ref.start);
  const entry = renderUnit(name, form, opts, {
    multiline: ref.multiline,
    indent,
    inner: innerIndent(top, ref, t, `${indent}  `),
    nl,
  });
  if (before) {
    // Above the anchor and any comment lines directly attached to it.
    let at = t.lineStart(ref.start);
    for (let p = t.prevLine(at); p && /^[ \t]*#/.test(p.text); p = t.prevLine(at)) at = p.start;
    return `${text.slice(0, at)}${indent}${entry}${nl}${blank ? nl : ''}${text.slice(at)}`;
  }
  const end = t.lineEnd(ref.end);
  const at = end < text.length ? end + 1 : end;
  const lead = end < text.length ? '' : nl;
  return `${text.slice(0, at)}${lead}${blank ? nl : ''}${indent}${entry}${nl}${text.slice(at)}`;
}

/**
 * The text of users.nix without the entries of `name`. Returns undefined when there is none.
 * Exported for tests; `removeUser` is the command.
 */
export function removeUserEntry(text: string, name: string, file = 'users.nix'): string | undefined {
  const parsed = parseNixData(Buffer.from(text, 'latin1'), file);
  if (parsed.errors.length || !parsed.value) {
    throw new RegistryEditError(
      `${file} has errors; fix them first`,
      parsed.errors.map((e) => e.message),
    );
  }
  const top = parsed.value;
  if (top.kind !== 'attrs' && top.kind !== 'list') return undefined;
  const form = top.kind === 'attrs' ? 'attrs' : 'list';
  const open = top.span.start;
  let close = top.span.end - 1;
  let t = new Text(text);
  const units = unitsOf(top, form, t)
    .filter((u) => u.name === name)
    .sort((a, b) => b.start - a.start);
  if (units.length === 0) return undefined;
  let s = text;
  for (const u of units) {
    t = new Text(s);
    if (u.startsLine && t.endsLine(u.end)) {
      let from = t.lineStart(u.start);
      const endNl = t.lineEnd(u.end);
      let to = endNl < s.length ? endNl + 1 : endNl;
      const prev = t.prevLine(from);
      const next = t.nextLine(endNl);
      const prevBlank = prev !== undefined && isBlank(prev.text);
      const nextBlank = next !== undefined && isBlank(next.text);
      const prevIsOpener = prev !== undefined && prev.end > open && prev.start <= open && t.endsLine(open + 1);
      const nextIsCloser =
        next !== undefined && next.start <= close && next.end > close && isBlank(s.slice(next.start, close));
      if (nextBlank && (prevBlank || prevIsOpener)) to = next.end < s.length ? next.end + 1 : next.end;
      else if (prevBlank && nextIsCloser) from = prev.start;
      s = s.slice(0, from) + s.slice(to);
      close -= to - from;
    } else {
      // Inline: take the entry and the spaces after it (or before it, at the end).
      let from = u.start;
      let to = u.end;
      const after = /^[ \t]*/.exec(s.slice(to))![0].length;
      if (after > 0) to += after;
      else while (from > 0 && (s[from - 1] === ' ' || s[from - 1] === '\t')) from--;
      s = s.slice(0, from) + s.slice(to);
      close -= to - from;
    }
  }
  return s;
}

/**
 * Add a user: write `keys/NAME` and insert the entry into users.nix. Refuses an invalid or existing name, a key
 * that is already someone's, a private key, a key file that is already there, and a registry with syntax errors.
 */
export async function addUser(
  dir: string,
  name: string,
  key: string | Buffer,
  opts: AddUserOptions & { keyLabel?: string } = {},
): Promise<AddUserResult> {
  const nameErr = userNameProblem(name);
  if (nameErr) throw new RegistryEditError(nameErr);
  const input = { text: typeof key === 'string' ? Buffer.from(key, 'utf8') : key, label: opts.keyLabel ?? 'the key' };
  const parsedKeys = parseAuthorizedKeys(input.text);
  if (parsedKeys.hasPrivateKey) {
    throw new RegistryEditError(
      `${input.label} is a PRIVATE key: give the public key instead (the .pub file, or ssh-keygen -y -f KEY). Nothing was written.`,
    );
  }
  const keyErrors = parsedKeys.problems.filter((p) => p.severity === 'error');
  if (keyErrors.length) {
    throw new RegistryEditError(
      `${input.label} has lines that are not usable public keys; nothing was written`,
      keyErrors.map((p) => `line ${p.line}:${p.col}: ${p.message}`),
    );
  }
  if (parsedKeys.keys.length === 0) throw new RegistryEditError(`no public key found in ${input.label}`);

  const a = await analyzeForEdit(dir, opts);
  const existing = a.entries.find((e) => e.name === name);
  if (existing) {
    throw new RegistryEditError(
      `user ${JSON.stringify(name)} already exists (${displayPath(a.file)}:${existing.nameSpan.line}:${existing.nameSpan.col})`,
    );
  }
  for (const v of opts.vouchedBy ?? []) {
    if (!a.entries.some((e) => e.name === v))
      throw new RegistryEditError(`unknown voucher ${JSON.stringify(v)}: there is no such user`);
  }
  for (const [file, kf] of a.keyFiles) {
    for (const k of kf.result?.keys ?? []) {
      const mine = parsedKeys.keys.find((x) => x.blob.equals(k.blob));
      if (!mine) continue;
      const owner = kf.users.length ? `user ${JSON.stringify(kf.users[0])}` : 'nobody yet';
      throw new RegistryEditError(
        `key ${mine.fingerprint} is already in ${displayPath(file)}:${k.line} (${owner}); a key belongs to one user`,
      );
    }
  }
  const keyFile = resolve(dirname(a.file), 'keys', name);
  try {
    await stat(keyFile);
    throw new RegistryEditError(`${displayPath(keyFile)} already exists; remove it or choose another name`);
  } catch (e) {
    if (e instanceof RegistryEditError) throw e;
  }

  const original = a.missing ? undefined : await readFile(a.file);
  const before = original ? original.toString('latin1') : '{\n}\n';
  const after = insertUserEntry(before, name, opts, displayPath(a.file));
  // Check the result before writing anything.
  const check = parseNixData(Buffer.from(after, 'latin1'), a.file);
  if (check.errors.length)
    throw new Error(`internal error: the edited ${a.file} does not parse: ${check.errors[0]!.message}`);

  const keyText = `${parsedKeys.keys.map((k) => k.text.trim()).join('\n')}\n`;
  await mkdir(dirname(keyFile), { recursive: true });
  await writeFileAtomic(keyFile, keyText);
  try {
    await writeUsersFile(a.file, original, Buffer.from(after, 'latin1'));
  } catch (e) {
    await unlink(keyFile).catch(() => {});
    throw e;
  }
  return {
    usersFile: a.file,
    keyFile,
    fingerprints: parsedKeys.keys.map((k) => k.fingerprint),
    notes: parsedKeys.keys.filter((k) => !k.usable).map((k) => `${k.fingerprint}: ${k.unusableReason}`),
    created: original === undefined,
  };
}

/** Replace users.nix, refusing if it changed since it was read (another edit raced us). */
async function writeUsersFile(file: string, original: Buffer | undefined, content: Buffer): Promise<void> {
  let mode = 0o644;
  try {
    const now = await readFile(file);
    if (!original || !now.equals(original)) {
      throw new RegistryEditError(`${displayPath(file)} changed while it was being edited; try again`);
    }
    mode = (await stat(file)).mode & 0o7777;
  } catch (e) {
    if (e instanceof RegistryEditError) throw e;
    if (original) throw e;
  }
  await writeFileAtomic(file, content, mode);
}

/** Remove a user: its entries in users.nix, then its key file (when inside the registry and nobody else's). */
export async function removeUser(dir: string, name: string, opts: EditOptions = {}): Promise<RemoveUserResult> {
  const a = await analyzeForEdit(dir, opts);
  if (a.missing) throw new RegistryEditError(`there is no ${displayPath(a.file)}`);
  const original = await readFile(a.file);
  const after = removeUserEntry(original.toString('latin1'), name, displayPath(a.file));
  if (after === undefined) throw new RegistryEditError(`no user ${JSON.stringify(name)} in ${displayPath(a.file)}`);
  const entry = a.entries.find((e) => e.name === name);
  let keyFile: string | undefined;
  if (entry?.value.kind === 'attrs') {
    const k = entry.value.fields.get('keys')?.value;
    if (k?.kind === 'path' && !k.value.startsWith('/')) {
      const abs = resolve(dirname(a.file), k.value);
      const rel = relative(a.dir, abs);
      const sharedWith = a.entries.some((e) => {
        if (e.name === name || e.value.kind !== 'attrs') return false;
        const o = e.value.fields.get('keys')?.value;
        return o?.kind === 'path' && resolve(dirname(a.file), o.value) === abs;
      });
      if (!rel.startsWith('..') && !sharedWith) keyFile = abs;
    }
  }
  await writeUsersFile(a.file, original, Buffer.from(after, 'latin1'));
  if (keyFile) {
    try {
      await unlink(keyFile);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      keyFile = undefined;
    }
  }
  return keyFile ? { usersFile: a.file, keyFile } : { usersFile: a.file };
}
