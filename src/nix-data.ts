/**
 * A parser for the *data subset* of the Nix language: attribute sets, lists, strings (`"…"` and `''…''`), integers,
 * floats, booleans, null and paths, with comments. This is what `users.nix` may contain; nothing here evaluates.
 *
 * Anything that is not plain data (functions, `let`, `with`, `rec`, `import`, `inherit`, variables, operators,
 * function application, interpolation `${…}`, search paths `<…>`) is refused with its location and the construct's
 * name. Errors are collected: the parser recovers at `;`, `]` and `}` so one run reports as many as it can.
 *
 * The input is handled as bytes (a latin1 string, one char per byte), so every node's `start`/`end` are byte offsets
 * into the file and an editor can splice text into it while keeping every other byte. Lines and columns are 1-based;
 * columns count characters (UTF-8 sequences), like an editor does. Decoded string values and attribute names are
 * UTF-8 JS strings.
 */

export interface Span {
  /** Byte offset of the first byte. */
  start: number;
  /** Byte offset just past the last byte. */
  end: number;
  line: number;
  col: number;
  endLine: number;
  endCol: number;
}

interface NodeBase {
  span: Span;
}

export interface NixAttrName {
  name: string;
  quoted: boolean;
  span: Span;
}

/** One `path = value;` as written. `span` runs from the first name to just past the `;`. */
export interface NixAttrEntry {
  path: NixAttrName[];
  value: NixValue;
  span: Span;
}

/** A resolved attribute (after merging dotted paths). */
export interface NixField {
  name: string;
  nameSpan: Span;
  value: NixValue;
  /** The entry that defined it (for a dotted path `a.b = …;`, the first entry that mentioned `a`). */
  entry: NixAttrEntry;
}

export interface NixAttrs extends NodeBase {
  kind: 'attrs';
  /** Entries in source order, as written. */
  entries: NixAttrEntry[];
  /** Attributes by name, dotted paths merged into nested sets. */
  fields: Map<string, NixField>;
  /** True for a set implied by a dotted path (`a.b = 1;` makes `a`); its span is that of the first path element. */
  synthetic: boolean;
}

export interface NixList extends NodeBase {
  kind: 'list';
  items: NixValue[];
}

export interface NixString extends NodeBase {
  kind: 'string';
  value: string;
  indented: boolean;
}

export interface NixInt extends NodeBase {
  kind: 'int';
  value: number;
}

export interface NixFloat extends NodeBase {
  kind: 'float';
  value: number;
}

export interface NixBool extends NodeBase {
  kind: 'bool';
  value: boolean;
}

export interface NixNull extends NodeBase {
  kind: 'null';
}

export interface NixPath extends NodeBase {
  kind: 'path';
  /** The path as written, e.g. `./keys/alice` or `keys/alice`. */
  value: string;
}

export type NixValue = NixAttrs | NixList | NixString | NixInt | NixFloat | NixBool | NixNull | NixPath;

export class NixDataError extends Error {
  constructor(
    readonly file: string,
    readonly line: number,
    readonly col: number,
    readonly offset: number,
    readonly reason: string,
  ) {
    super(`${file}:${line}:${col}: ${reason}`);
    this.name = 'NixDataError';
  }
}

export interface NixParseResult {
  /** The parsed value; undefined when errors left nothing usable. Present values may still come with errors. */
  value: NixValue | undefined;
  errors: NixDataError[];
  source: SourceText;
}

/** Byte text with line/column lookup. */
export class SourceText {
  /** The file as a latin1 string (one char per byte). */
  readonly text: string;
  private readonly lineStarts: number[] = [0];

  constructor(
    input: string | Buffer,
    readonly file: string,
  ) {
    this.text = typeof input === 'string' ? Buffer.from(input, 'utf8').toString('latin1') : input.toString('latin1');
    for (let i = 0; i < this.text.length; i++) if (this.text.charCodeAt(i) === 10) this.lineStarts.push(i + 1);
  }

  /** 1-based line and column (in characters) of a byte offset. */
  pos(offset: number): { line: number; col: number } {
    let lo = 0;
    let hi = this.lineStarts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.lineStarts[mid]! <= offset) lo = mid;
      else hi = mid - 1;
    }
    const lineStart = this.lineStarts[lo]!;
    let col = 1;
    for (let i = lineStart; i < offset && i < this.text.length; i++) {
      const c = this.text.charCodeAt(i);
      if (c < 0x80 || c >= 0xc0) col++; // not a UTF-8 continuation byte
    }
    return { line: lo + 1, col };
  }

  span(start: number, end: number): Span {
    const a = this.pos(start);
    const b = this.pos(end);
    return { start, end, line: a.line, col: a.col, endLine: b.line, endCol: b.col };
  }

  /** Byte offset of the start of a 1-based line. */
  lineStart(line: number): number {
    return this.lineStarts[line - 1] ?? this.text.length;
  }

  get lineCount(): number {
    return this.lineStarts.length;
  }
}

const PLAIN = '(plain data only)';
const MAX_ERRORS = 200;
/** Deeper nesting than this is refused (hostile input must not exhaust the stack). */
export const MAX_NESTING = 64;

const KEYWORDS = new Set(['if', 'then', 'else', 'assert', 'with', 'let', 'in', 'rec', 'inherit', 'or']);

type TokType = 'id' | 'int' | 'float' | 'str' | 'path' | 'hpath' | 'spath' | 'uri' | 'op' | 'eof';

interface Tok {
  t: TokType;
  /** Raw text (latin1). For 'op' the operator. */
  s: string;
  start: number;
  end: number;
  /** Decoded value of a string (UTF-8 JS string). */
  value?: string;
  indented?: boolean;
  /** Already reported by the lexer (interpolation, unterminated…): the parser must not report it again. */
  bad?: boolean;
}

const PATH_RE = /[a-zA-Z0-9._\-+]*(?:\/[a-zA-Z0-9._\-+]+)+\/?/y;
const HPATH_RE = /~(?:\/[a-zA-Z0-9._\-+]+)+\/?/y;
const SPATH_RE = /<[a-zA-Z0-9._\-+]+(?:\/[a-zA-Z0-9._\-+]+)*>/y;
const URI_RE = /[a-zA-Z][a-zA-Z0-9+\-.]*:[a-zA-Z0-9%/?:@&=+$,\-_.!~*']+/y;
const ID_RE = /[a-zA-Z_][a-zA-Z0-9_'-]*/y;
const INT_RE = /[0-9]+/y;
const FLOAT_RE = /(?:(?:[1-9][0-9]*\.[0-9]*)|(?:0?\.[0-9]+))(?:[Ee][+-]?[0-9]+)?/y;
const OPS = [
  '...',
  '${',
  '++',
  '//',
  '==',
  '!=',
  '<=',
  '>=',
  '&&',
  '||',
  '->',
  '{',
  '}',
  '[',
  ']',
  '(',
  ')',
  ';',
  '=',
  '.',
  ',',
  ':',
  '@',
  '?',
  '+',
  '-',
  '*',
  '/',
  '<',
  '>',
  '!',
];
const BINARY_OPS = new Set(['++', '//', '==', '!=', '<=', '>=', '&&', '||', '->', '+', '-', '*', '/', '<', '>', '?']);

function utf8(latin1: string): string {
  return Buffer.from(latin1, 'latin1').toString('utf8');
}

function matchAt(re: RegExp, text: string, pos: number): string | undefined {
  re.lastIndex = pos;
  const m = re.exec(text);
  return m ? m[0] : undefined;
}

class Lexer {
  readonly toks: Tok[] = [];
  private pos = 0;
  /** An unterminated string or comment ran to the end of the file: "missing `}`" would only be noise. */
  truncated = false;

  constructor(
    private readonly src: SourceText,
    private readonly err: (offset: number, msg: string) => void,
  ) {}

  run(): Tok[] {
    const text = this.src.text;
    while (true) {
      this.skipTrivia();
      if (this.pos >= text.length) break;
      const tok = this.next();
      if (tok) this.toks.push(tok);
    }
    this.toks.push({ t: 'eof', s: '', start: text.length, end: text.length });
    return this.toks;
  }

  private skipTrivia(): void {
    const text = this.src.text;
    while (this.pos < text.length) {
      const c = text[this.pos]!;
      if (c === ' ' || c === '\t' || c === '\n' || c === '\r') this.pos++;
      else if (c === '#') {
        const nl = text.indexOf('\n', this.pos);
        this.pos = nl < 0 ? text.length : nl + 1;
      } else if (c === '/' && text[this.pos + 1] === '*') {
        const close = text.indexOf('*/', this.pos + 2);
        if (close < 0) {
          this.err(this.pos, 'unterminated comment `/* … */` (opened here)');
          this.truncated = true;
          this.pos = text.length;
        } else this.pos = close + 2;
      } else break;
    }
  }

  private next(): Tok | undefined {
    const text = this.src.text;
    const start = this.pos;
    const c = text[start]!;
    if (c === '"') return this.string();
    if (c === "'" && text[start + 1] === "'") return this.indentedString();

    // Longest match among the word-like tokens; on a tie the earlier kind wins (as in Nix's flex lexer).
    const cands: Array<[TokType, string | undefined]> = [
      ['id', matchAt(ID_RE, text, start)],
      ['int', matchAt(INT_RE, text, start)],
      ['float', matchAt(FLOAT_RE, text, start)],
      ['path', matchAt(PATH_RE, text, start)],
      ['hpath', matchAt(HPATH_RE, text, start)],
      ['spath', matchAt(SPATH_RE, text, start)],
      ['uri', matchAt(URI_RE, text, start)],
    ];
    let best: [TokType, string] | undefined;
    for (const [t, m] of cands) if (m && (!best || m.length > best[1].length)) best = [t, m];
    if (best) {
      const [t, s] = best;
      this.pos = start + s.length;
      const tok: Tok = { t, s, start, end: this.pos };
      if (t === 'path' || t === 'hpath') {
        if (text.startsWith('${', this.pos)) {
          this.err(this.pos, `string interpolation \`\${…}\` is not allowed ${PLAIN}`);
          this.pos = this.skipInterpolation(this.pos + 2);
          // Swallow the rest of an interpolated path (`./a/${x}/b`).
          const rest = matchAt(/[a-zA-Z0-9._\-+/]*/y, text, this.pos) ?? '';
          this.pos += rest.length;
          tok.end = this.pos;
          tok.bad = true;
        } else if (s.endsWith('/')) {
          this.err(start, `path \`${utf8(s)}\` has a trailing slash`);
          tok.bad = true;
        }
      }
      return tok;
    }
    for (const op of OPS) {
      if (text.startsWith(op, start)) {
        this.pos = start + op.length;
        return { t: 'op', s: op, start, end: this.pos };
      }
    }
    // Unknown character: report it once (a whole UTF-8 sequence at a time).
    let end = start + 1;
    if (c.charCodeAt(0) >= 0xc0) while (end < text.length && (text.charCodeAt(end) & 0xc0) === 0x80) end++;
    this.err(start, `unexpected character \`${utf8(text.slice(start, end))}\``);
    this.pos = end;
    return undefined;
  }

  /** Skip the body of `${ … }` starting just after `${`; returns the offset after the matching `}`. */
  private skipInterpolation(from: number): number {
    const text = this.src.text;
    let depth = 1;
    let i = from;
    while (i < text.length && depth > 0) {
      const c = text[i]!;
      if (c === '{') depth++;
      else if (c === '}') depth--;
      else if (c === '"') {
        i++;
        while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
      }
      i++;
    }
    return i;
  }

  private string(): Tok {
    const text = this.src.text;
    const start = this.pos;
    let i = start + 1;
    let out = '';
    let bad = false;
    while (true) {
      if (i >= text.length) {
        this.err(start, 'unterminated string (opened here)');
        this.truncated = true;
        this.pos = text.length;
        return { t: 'str', s: text.slice(start), start, end: this.pos, value: utf8(out), bad: true };
      }
      const c = text[i]!;
      if (c === '"') break;
      if (c === '\\') {
        const n = text[i + 1];
        if (n === undefined) {
          i++;
          continue;
        }
        out += n === 'n' ? '\n' : n === 'r' ? '\r' : n === 't' ? '\t' : n;
        i += 2;
      } else if (c === '$' && text[i + 1] === '{') {
        if (!bad) this.err(i, `string interpolation \`\${…}\` is not allowed ${PLAIN}`);
        bad = true;
        i = this.skipInterpolation(i + 2);
      } else if (c === '$' && text[i + 1] === '$') {
        out += '$$';
        i += 2;
      } else {
        out += c;
        i++;
      }
    }
    this.pos = i + 1;
    return { t: 'str', s: text.slice(start, this.pos), start, end: this.pos, value: utf8(out), bad };
  }

  private indentedString(): Tok {
    const text = this.src.text;
    const start = this.pos;
    let i = start + 2;
    // `''` followed by spaces and a newline: that first line is dropped.
    const first = /[ ]*\n/y;
    first.lastIndex = i;
    if (first.exec(text)) i = first.lastIndex;
    const parts: Array<{ s: string; escaped: boolean }> = [];
    const lit = (s: string) => {
      const last = parts[parts.length - 1];
      if (last && !last.escaped) last.s += s;
      else parts.push({ s, escaped: false });
    };
    let bad = false;
    while (true) {
      if (i >= text.length) {
        this.err(start, "unterminated indented string `''…''` (opened here)");
        this.truncated = true;
        this.pos = text.length;
        return { t: 'str', s: text.slice(start), start, end: this.pos, value: '', indented: true, bad: true };
      }
      if (text.startsWith("'''", i)) {
        parts.push({ s: "''", escaped: true });
        i += 3;
      } else if (text.startsWith("''$", i)) {
        parts.push({ s: '$', escaped: true });
        i += 3;
      } else if (text.startsWith("''\\", i) && i + 3 < text.length) {
        const n = text[i + 3]!;
        parts.push({ s: n === 'n' ? '\n' : n === 'r' ? '\r' : n === 't' ? '\t' : n, escaped: true });
        i += 4;
      } else if (text.startsWith("''", i)) {
        i += 2;
        break;
      } else if (text.startsWith('${', i)) {
        if (!bad) this.err(i, `string interpolation \`\${…}\` is not allowed ${PLAIN}`);
        bad = true;
        i = this.skipInterpolation(i + 2);
      } else if (text.startsWith('$$', i)) {
        lit('$$');
        i += 2;
      } else {
        lit(text[i]!);
        i++;
      }
    }
    this.pos = i;
    return {
      t: 'str',
      s: text.slice(start, i),
      start,
      end: i,
      value: utf8(stripIndentation(parts)),
      indented: true,
      bad,
    };
  }
}

/** Nix's indentation stripping for `''…''` strings. */
function stripIndentation(parts: Array<{ s: string; escaped: boolean }>): string {
  let minIndent = Number.POSITIVE_INFINITY;
  let atStart = true;
  let cur = 0;
  for (const p of parts) {
    if (p.escaped) {
      if (atStart) {
        atStart = false;
        minIndent = Math.min(minIndent, cur);
      }
      continue;
    }
    for (const ch of p.s) {
      if (atStart) {
        if (ch === ' ') cur++;
        else if (ch === '\n') cur = 0;
        else {
          atStart = false;
          minIndent = Math.min(minIndent, cur);
        }
      } else if (ch === '\n') {
        atStart = true;
        cur = 0;
      }
    }
  }
  if (minIndent === Number.POSITIVE_INFINITY) minIndent = 0;
  let out = '';
  atStart = true;
  let dropped = 0;
  for (const p of parts) {
    if (p.escaped) {
      atStart = false;
      out += p.s;
      continue;
    }
    for (const ch of p.s) {
      if (atStart) {
        if (ch === ' ' && dropped < minIndent) {
          dropped++;
          continue;
        }
        atStart = false;
      }
      out += ch;
      if (ch === '\n') {
        atStart = true;
        dropped = 0;
      }
    }
  }
  // A last line made only of spaces is dropped.
  const lastNl = out.lastIndexOf('\n');
  if (/^ *$/.test(out.slice(lastNl + 1)) && (lastNl >= 0 || parts.every((p) => !p.escaped))) {
    out = out.slice(0, lastNl + 1);
  }
  return out;
}

function describe(tok: Tok): string {
  switch (tok.t) {
    case 'eof':
      return 'end of file';
    case 'str':
      return 'a string';
    case 'op':
      return `\`${tok.s}\``;
    default:
      return `\`${utf8(tok.s)}\``;
  }
}

class Parser {
  private i = 0;
  /** Open containers, innermost last: used to tell a stray closer from one that closes an outer container. */
  private readonly open: string[] = [];
  /** Parsing stopped (too deep): nothing after this is worth reporting. */
  fatal = false;

  constructor(
    private readonly toks: Tok[],
    private readonly src: SourceText,
    private readonly err: (offset: number, msg: string) => void,
  ) {}

  private get tok(): Tok {
    return this.toks[this.i]!;
  }

  private peek(n = 1): Tok {
    return this.toks[Math.min(this.i + n, this.toks.length - 1)]!;
  }

  private isOp(tok: Tok, ...ops: string[]): boolean {
    return tok.t === 'op' && ops.includes(tok.s);
  }

  parseTop(): NixValue | undefined {
    if (this.tok.t === 'eof') {
      this.err(this.tok.start, 'expected a value, found end of file');
      return undefined;
    }
    const v = this.value('top');
    if ((this.tok as Tok).t !== 'eof') {
      const t = this.tok;
      if (v && BINARY_OPS.has(t.s) && t.t === 'op') this.err(t.start, `operator \`${t.s}\` is not allowed ${PLAIN}`);
      else if (v && this.isOp(t, '.')) this.err(t.start, `attribute selection \`.\` is not allowed ${PLAIN}`);
      else if (v && this.startsValue(t)) this.err(t.start, `function application is not allowed ${PLAIN}`);
      else if (v) this.err(t.start, `unexpected ${describe(t)} after the end of the data`);
      return undefined;
    }
    return v;
  }

  private startsValue(t: Tok): boolean {
    if (t.t === 'eof') return false;
    if (t.t === 'op') return ['{', '[', '(', '${'].includes(t.s);
    if (t.t === 'id') return !['then', 'else', 'in', 'or'].includes(t.s);
    return true;
  }

  /** Skip one term: a single token or a balanced bracket group. */
  private skipTerm(): void {
    const t = this.tok;
    if (t.t === 'eof') return;
    if (this.isOp(t, '{', '[', '(', '${')) {
      let depth = 0;
      do {
        const x = this.tok;
        if (this.isOp(x, '{', '[', '(', '${')) depth++;
        else if (this.isOp(x, '}', ']', ')')) depth--;
        this.i++;
      } while (depth > 0 && this.tok.t !== 'eof');
      return;
    }
    this.i++;
  }

  /** Skip to a `;` or a closing bracket at this nesting level (neither consumed). */
  private skipExpr(): void {
    while (this.tok.t !== 'eof' && !this.isOp(this.tok, ';', '}', ']', ')')) this.skipTerm();
  }

  /** Skip the rest of a term in a list: operators and further operands. */
  private skipListTail(): void {
    while (this.tok.t === 'op' && (BINARY_OPS.has(this.tok.s) || this.tok.s === '.')) {
      this.i++;
      if (!this.isOp(this.tok, ']')) this.skipTerm();
    }
  }

  private value(ctx: 'top' | 'attr' | 'list'): NixValue | undefined {
    const t = this.tok;
    const fail = (offset: number, msg: string): undefined => {
      this.err(offset, msg);
      if (ctx === 'list') {
        this.skipTerm();
        this.skipListTail();
      } else this.skipExpr();
      return undefined;
    };
    switch (t.t) {
      case 'eof':
        this.err(t.start, 'expected a value, found end of file');
        return undefined;
      case 'str':
        this.i++;
        if (t.bad) return undefined;
        return { kind: 'string', value: t.value ?? '', indented: !!t.indented, span: this.src.span(t.start, t.end) };
      case 'int': {
        this.i++;
        const n = Number(t.s);
        if (!Number.isSafeInteger(n)) {
          this.err(t.start, `integer ${t.s} is out of range`);
          return undefined;
        }
        return { kind: 'int', value: n, span: this.src.span(t.start, t.end) };
      }
      case 'float':
        this.i++;
        return { kind: 'float', value: Number(t.s), span: this.src.span(t.start, t.end) };
      case 'path':
        this.i++;
        if (t.bad) return undefined;
        return { kind: 'path', value: utf8(t.s), span: this.src.span(t.start, t.end) };
      case 'hpath':
        this.i++;
        if (t.bad) return undefined;
        this.err(t.start, `home-relative path \`${utf8(t.s)}\` is not allowed ${PLAIN}`);
        return undefined;
      case 'spath':
        this.i++;
        this.err(t.start, `search path \`${utf8(t.s)}\` is not allowed ${PLAIN}`);
        return undefined;
      case 'uri':
        this.i++;
        this.err(t.start, `unquoted URL \`${utf8(t.s)}\` is not allowed; write it as a string "${utf8(t.s)}"`);
        return undefined;
      case 'id':
        return this.identifierValue(t, ctx, fail);
      case 'op':
        break;
    }
    if ((t.s === '{' || t.s === '[') && this.open.length >= MAX_NESTING) {
      this.err(t.start, `nested deeper than ${MAX_NESTING} levels`);
      this.fatal = true;
      this.i = this.toks.length - 1;
      return undefined;
    }
    switch (t.s) {
      case '{':
        return this.attrs(ctx);
      case '[':
        return this.list();
      case '-': {
        const n = this.peek();
        if ((n.t === 'int' || n.t === 'float') && n.start === t.end) {
          this.i += 2;
          const v = -Number(n.s);
          const span = this.src.span(t.start, n.end);
          if (n.t === 'float') return { kind: 'float', value: v, span };
          if (!Number.isSafeInteger(v)) {
            this.err(t.start, `integer -${n.s} is out of range`);
            return undefined;
          }
          return { kind: 'int', value: v, span };
        }
        return fail(t.start, `operator \`-\` is not allowed ${PLAIN}`);
      }
      case '(':
        return fail(t.start, `parenthesised expression is not allowed ${PLAIN}`);
      case '${':
        return fail(t.start, `string interpolation \`\${…}\` is not allowed ${PLAIN}`);
      case '!':
        return fail(t.start, `operator \`!\` is not allowed ${PLAIN}`);
      default:
        if (ctx === 'list' && this.isOp(t, ';')) {
          this.err(t.start, 'unexpected `;` in a list (list elements are separated by spaces)');
          this.i++;
          return undefined;
        }
        this.err(t.start, `expected a value, found ${describe(t)}`);
        if (ctx === 'list' && !this.isOp(t, '}', ')')) this.i++;
        return undefined;
    }
  }

  private identifierValue(
    t: Tok,
    ctx: 'top' | 'attr' | 'list',
    fail: (offset: number, msg: string) => undefined,
  ): NixValue | undefined {
    const span = this.src.span(t.start, t.end);
    switch (t.s) {
      case 'true':
      case 'false':
        this.i++;
        return { kind: 'bool', value: t.s === 'true', span };
      case 'null':
        this.i++;
        return { kind: 'null', span };
      case 'let':
        return this.fatalOrSkip(ctx, t, `\`let … in\` is not allowed ${PLAIN}`);
      case 'with':
        return this.fatalOrSkip(ctx, t, `\`with\` is not allowed ${PLAIN}`);
      case 'assert':
        return this.fatalOrSkip(ctx, t, `\`assert\` is not allowed ${PLAIN}`);
      case 'if':
        return this.fatalOrSkip(ctx, t, `\`if … then … else\` is not allowed ${PLAIN}`);
      case 'rec':
        if (this.isOp(this.peek(), '{')) {
          this.err(t.start, `recursive attribute set \`rec { … }\` is not allowed ${PLAIN}`);
          this.i++;
          this.attrs(ctx); // report what is inside too
          return undefined;
        }
        return fail(t.start, `\`rec\` is not allowed ${PLAIN}`);
      case 'import':
        return fail(t.start, `\`import\` is not allowed ${PLAIN}`);
      case 'inherit':
        return fail(t.start, `\`inherit\` is not allowed ${PLAIN}`);
    }
    const n = this.peek();
    if (this.isOp(n, ':', '@')) return this.fatalOrSkip(ctx, t, `function definition is not allowed ${PLAIN}`);
    if (KEYWORDS.has(t.s)) return fail(t.start, `unexpected keyword \`${t.s}\``);
    return fail(t.start, `variable \`${utf8(t.s)}\` is not allowed ${PLAIN}; quote it if you meant a string`);
  }

  /** For constructs whose extent we cannot know (`let`, functions…): at top level nothing more can be said. */
  private fatalOrSkip(ctx: 'top' | 'attr' | 'list', t: Tok, msg: string): undefined {
    this.err(t.start, msg);
    if (ctx === 'top') this.i = this.toks.length - 1;
    else if (ctx === 'attr' && t.t === 'id' && t.s === 'let') {
      // `let … in body`: the bindings hold `;`s of their own.
      this.i++;
      while (this.tok.t !== 'eof' && !(this.tok.t === 'id' && this.tok.s === 'in') && !this.isOp(this.tok, '}')) {
        this.skipTerm();
      }
      if (this.tok.t === 'id') this.i++;
      this.skipExpr();
    } else if (ctx === 'attr' && t.t === 'id' && (t.s === 'with' || t.s === 'assert')) {
      this.skipExpr();
      if (this.isOp(this.tok, ';')) this.i++;
      this.skipExpr();
    } else if (ctx === 'list') {
      // Inside a list a `let`/function runs to the closing bracket.
      while (this.tok.t !== 'eof' && !this.isOp(this.tok, ']', '}')) this.skipTerm();
    } else this.skipExpr();
    return undefined;
  }

  /** `{` … `}` — also recognises a function's argument set `{ a, b ? 1, ... }:`. */
  private attrs(ctx: 'top' | 'attr' | 'list'): NixAttrs | undefined {
    const open = this.tok;
    const a = this.peek();
    const b = this.peek(2);
    const looksLikeFormals =
      this.isOp(a, '...') ||
      (this.isOp(a, '}') && this.isOp(b, ':', '@')) ||
      (a.t === 'id' && (this.isOp(b, ',', '?') || (this.isOp(b, '}') && this.isOp(this.peek(3), ':', '@'))));
    if (looksLikeFormals) return this.fatalOrSkip(ctx, open, `function definition is not allowed ${PLAIN}`);

    this.i++;
    this.open.push('{');
    const entries: NixAttrEntry[] = [];
    let ok = true;
    while (true) {
      const t = this.tok;
      if (t.t === 'eof') {
        this.err(open.start, 'unclosed `{` (missing `}`)');
        this.open.pop();
        return undefined;
      }
      if (this.isOp(t, '}')) {
        this.i++;
        this.open.pop();
        break;
      }
      if (this.isOp(t, ']', ')')) {
        if (t.s === ']' && this.open.includes('[')) {
          // Closes an enclosing list: this set lacks its `}`.
          this.err(
            t.start,
            `unclosed \`{\` at ${this.src.pos(open.start).line}:${this.src.pos(open.start).col} (missing \`}\`)`,
          );
          this.open.pop();
          return undefined;
        }
        this.err(t.start, `unexpected \`${t.s}\` in an attribute set`);
        this.i++;
        ok = false;
        continue;
      }
      if (this.isOp(t, ';')) {
        this.err(t.start, 'unexpected `;` (an attribute is written `name = value;`)');
        this.i++;
        ok = false;
        continue;
      }
      if (t.t === 'id' && t.s === 'inherit') {
        this.err(t.start, `\`inherit\` is not allowed ${PLAIN}`);
        this.skipExpr();
        if (this.isOp(this.tok, ';')) this.i++;
        ok = false;
        continue;
      }
      const entry = this.entry();
      if (entry) entries.push(entry);
      else ok = false;
    }
    const node: NixAttrs = {
      kind: 'attrs',
      entries,
      fields: new Map(),
      synthetic: false,
      span: this.src.span(open.start, this.toks[this.i - 1]!.end),
    };
    if (!this.buildFields(node)) ok = false;
    return ok ? node : undefined;
  }

  /** One `a.b."c" = value;` — returns undefined (after reporting and recovering) if it is not data. */
  private entry(): NixAttrEntry | undefined {
    const path: NixAttrName[] = [];
    const first = this.tok;
    while (true) {
      const t = this.tok;
      if (t.t === 'id') {
        if (KEYWORDS.has(t.s)) {
          this.err(t.start, `keyword \`${t.s}\` cannot be an attribute name; quote it: "${t.s}"`);
          return this.recoverEntry();
        }
        path.push({ name: utf8(t.s), quoted: false, span: this.src.span(t.start, t.end) });
        this.i++;
      } else if (t.t === 'str' && !t.indented) {
        this.i++;
        if (t.bad) return this.recoverEntry();
        path.push({ name: t.value ?? '', quoted: true, span: this.src.span(t.start, t.end) });
      } else if (this.isOp(t, '${')) {
        this.err(t.start, `dynamic attribute name \`\${…}\` is not allowed ${PLAIN}`);
        return this.recoverEntry();
      } else {
        this.err(t.start, `expected an attribute name, found ${describe(t)}`);
        return this.recoverEntry();
      }
      if (this.isOp(this.tok, '.')) {
        this.i++;
        continue;
      }
      break;
    }
    const name = path.map((p) => p.name).join('.');
    if (!this.isOp(this.tok, '=')) {
      this.err(this.tok.start, `expected \`=\` after \`${name}\`, found ${describe(this.tok)}`);
      return this.recoverEntry();
    }
    this.i++;
    const value = this.value('attr');
    if (!value) {
      if (this.isOp(this.tok, ';')) this.i++;
      return undefined;
    }
    const t = this.tok;
    if (this.isOp(t, ';')) {
      this.i++;
      return { path, value, span: this.src.span(first.start, t.end) };
    }
    const prevEnd = this.toks[this.i - 1]!.end;
    if (t.t === 'op' && BINARY_OPS.has(t.s)) this.err(t.start, `operator \`${t.s}\` is not allowed ${PLAIN}`);
    else if (this.isOp(t, '.')) this.err(t.start, `attribute selection \`.\` is not allowed ${PLAIN}`);
    else if (this.isOp(t, '}') || t.t === 'eof' || this.nextLooksLikeEntry()) {
      // Most likely a forgotten `;`: report it where it belongs and carry on with the next entry.
      this.err(prevEnd, `missing \`;\` after the value of \`${name}\``);
      return undefined;
    } else if (this.startsValue(t)) this.err(t.start, `function application is not allowed ${PLAIN}`);
    else this.err(t.start, `expected \`;\` after the value of \`${name}\`, found ${describe(t)}`);
    return this.recoverEntry();
  }

  private nextLooksLikeEntry(): boolean {
    const t = this.tok;
    if (!(t.t === 'id' || (t.t === 'str' && !t.indented))) return false;
    return this.isOp(this.peek(), '=', '.');
  }

  private recoverEntry(): undefined {
    this.skipExpr();
    if (this.isOp(this.tok, ';')) this.i++;
    return undefined;
  }

  private list(): NixList | undefined {
    const open = this.tok;
    this.i++;
    this.open.push('[');
    const items: NixValue[] = [];
    let ok = true;
    while (true) {
      const t = this.tok;
      if (t.t === 'eof') {
        this.err(open.start, 'unclosed `[` (missing `]`)');
        this.open.pop();
        return undefined;
      }
      if (this.isOp(t, ']')) {
        this.i++;
        this.open.pop();
        break;
      }
      if (this.isOp(t, '}', ')')) {
        if (t.s === '}' && this.open.includes('{')) {
          // Closes an enclosing set: this list lacks its `]`.
          const p = this.src.pos(open.start);
          this.err(t.start, `unclosed \`[\` at ${p.line}:${p.col} (missing \`]\`)`);
          this.open.pop();
          return undefined;
        }
        this.err(t.start, `unexpected \`${t.s}\` in a list`);
        this.i++;
        ok = false;
        continue;
      }
      const v = this.value('list');
      if (!v) {
        ok = false;
        continue;
      }
      items.push(v);
      const n = this.tok;
      if (n.t === 'op' && BINARY_OPS.has(n.s)) {
        this.err(n.start, `operator \`${n.s}\` is not allowed ${PLAIN}`);
        this.skipListTail();
        ok = false;
      } else if (this.isOp(n, '.')) {
        this.err(n.start, `attribute selection \`.\` is not allowed ${PLAIN}`);
        this.skipListTail();
        ok = false;
      }
    }
    return ok ? { kind: 'list', items, span: this.src.span(open.start, this.toks[this.i - 1]!.end) } : undefined;
  }

  /** Merge entries into `fields`, reporting attributes defined twice. */
  private buildFields(node: NixAttrs): boolean {
    let ok = true;
    for (const entry of node.entries) {
      let target = node;
      for (let k = 0; k < entry.path.length; k++) {
        const seg = entry.path[k]!;
        const last = k === entry.path.length - 1;
        const existing = target.fields.get(seg.name);
        const fullName = entry.path
          .slice(0, k + 1)
          .map((p) => p.name)
          .join('.');
        if (last) {
          if (existing) {
            if (existing.value.kind === 'attrs' && entry.value.kind === 'attrs') {
              // `a.b = 1; a = { c = 2; };` merges in Nix.
              if (!this.mergeInto(existing.value, entry.value, fullName)) ok = false;
              continue;
            }
            this.dup(seg, fullName, existing.nameSpan);
            ok = false;
            continue;
          }
          target.fields.set(seg.name, { name: seg.name, nameSpan: seg.span, value: entry.value, entry });
        } else {
          if (existing) {
            if (existing.value.kind !== 'attrs') {
              this.dup(seg, fullName, existing.nameSpan);
              ok = false;
              break;
            }
            target = existing.value;
          } else {
            const synth: NixAttrs = { kind: 'attrs', entries: [], fields: new Map(), synthetic: true, span: seg.span };
            target.fields.set(seg.name, { name: seg.name, nameSpan: seg.span, value: synth, entry });
            target = synth;
          }
        }
      }
    }
    return ok;
  }

  private mergeInto(into: NixAttrs, from: NixAttrs, prefix: string): boolean {
    let ok = true;
    for (const [name, f] of from.fields) {
      const existing = into.fields.get(name);
      if (!existing) into.fields.set(name, f);
      else if (existing.value.kind === 'attrs' && f.value.kind === 'attrs') {
        if (!this.mergeInto(existing.value, f.value, `${prefix}.${name}`)) ok = false;
      } else {
        this.dup({ name, quoted: false, span: f.nameSpan }, `${prefix}.${name}`, existing.nameSpan);
        ok = false;
      }
    }
    return ok;
  }

  private dup(seg: NixAttrName, fullName: string, prev: Span): void {
    this.err(seg.span.start, `attribute \`${fullName}\` is already defined at ${prev.line}:${prev.col}`);
  }
}

/** Parse the data subset of Nix. Never throws on bad input: errors are returned, in source order. */
export function parseNixData(input: string | Buffer, file = '<input>'): NixParseResult {
  const source = new SourceText(input, file);
  const errors: NixDataError[] = [];
  const seen = new Set<number>();
  const err = (offset: number, msg: string) => {
    // One error per place: the first is the one that explains it; later ones are recovery noise.
    if (errors.length >= MAX_ERRORS || seen.has(offset)) return;
    seen.add(offset);
    const p = source.pos(offset);
    errors.push(new NixDataError(file, p.line, p.col, offset, msg));
  };
  const lexer = new Lexer(source, err);
  const toks = lexer.run();
  const eof = source.text.length;
  // After an unterminated string or comment, complaints about the end of the file only repeat that error.
  const parseErr = (offset: number, msg: string) => {
    if (lexer.truncated && (offset === eof || msg.startsWith('unclosed') || msg.endsWith('end of file'))) return;
    err(offset, msg);
  };
  let parser: Parser | undefined;
  const guarded = (offset: number, msg: string) => {
    if (!parser?.fatal) parseErr(offset, msg);
  };
  parser = new Parser(toks, source, guarded);
  const value = parser.parseTop();
  errors.sort((a, b) => a.offset - b.offset);
  return { value, errors, source };
}

/** A Nix path value in plain form. */
export interface PlainPath {
  path: string;
}

export type PlainValue = string | number | boolean | null | PlainPath | PlainValue[] | { [k: string]: PlainValue };

/** The value as plain JS: sets → objects (merged), lists → arrays, paths → `{ path }`. */
export function toPlain(v: NixValue): PlainValue {
  switch (v.kind) {
    case 'attrs': {
      const o: { [k: string]: PlainValue } = Object.create(null);
      for (const [k, f] of v.fields) o[k] = toPlain(f.value);
      return o;
    }
    case 'list':
      return v.items.map(toPlain);
    case 'path':
      return { path: v.value };
    case 'null':
      return null;
    default:
      return v.value;
  }
}

/** Is `name` usable unquoted as an attribute name? */
export function isPlainIdentifier(name: string): boolean {
  return /^[a-zA-Z_][a-zA-Z0-9_'-]*$/.test(name) && !KEYWORDS.has(name);
}

/** Render a string as a Nix string literal. */
export function quoteNixString(s: string): string {
  return `"${s.replace(/[\\"$\n\r\t]/g, (c) => {
    switch (c) {
      case '\n':
        return '\\n';
      case '\r':
        return '\\r';
      case '\t':
        return '\\t';
      case '$':
        return '\\$';
      default:
        return `\\${c}`;
    }
  })}"`;
}

/** Render an attribute name, quoting it when needed (`"0x4A6F"`). */
export function renderAttrName(name: string): string {
  return isPlainIdentifier(name) ? name : quoteNixString(name);
}
