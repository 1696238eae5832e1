/**
 * authorized_keys files (`keys/<name>` in the registry), parsed the way sshd reads them: optional options
 * (`restrict`, `cert-authority`, `from="…"`, `command="…"` with quoted commas…), the key type, the base64 key blob
 * (decoded and checked: the type inside must match, the structure must be complete) and a free comment.
 *
 * Each key gets its OpenSSH SHA256 fingerprint. Keys the built-in SSH server cannot honour (security keys `sk-…`,
 * `cert-authority` lines, `from=`/`command=` restrictions) are parsed and marked `usable: false` with the reason —
 * an OpenSSH front door can take them. Weak keys (RSA < 2048 bits, DSA) are errors, and a private key pasted by
 * mistake is reported loudly: it is no longer secret.
 */
import { createHash } from 'node:crypto';

export interface KeyOption {
  /** Lower-cased option name. */
  name: string;
  /** Unquoted value for `name="value"` options. */
  value?: string;
}

export interface AuthorizedKey {
  /** 1-based line number in the file. */
  line: number;
  /** 1-based column of the key type. */
  col: number;
  /** The whole line as written (without its newline). */
  text: string;
  options: KeyOption[];
  /** Key type, e.g. `ssh-ed25519`. */
  type: string;
  /** Same as `type`; the algorithm name an SSH client offers (RSA keys may also come as rsa-sha2-256/512). */
  algo: string;
  /** The decoded public key blob (what an SSH client presents). */
  blob: Buffer;
  comment: string;
  /** `SHA256:…` as `ssh-keygen -l` prints it. */
  fingerprint: string;
  /** Key size in bits (RSA modulus, ECDSA curve, 256 for ed25519). */
  bits: number;
  certAuthority: boolean;
  /** From `expiry-time="…"`: the key is refused after this instant. */
  expiresAt?: Date;
  /** Whether the built-in SSH server can accept this key. */
  usable: boolean;
  /** Why it cannot (only when `usable` is false). */
  unusableReason?: string;
}

export type KeyProblemKind = 'syntax' | 'weak' | 'private-key' | 'format' | 'expired' | 'duplicate';

export interface KeyProblem {
  line: number;
  col: number;
  severity: 'error' | 'warning';
  kind: KeyProblemKind;
  message: string;
}

export interface AuthorizedKeysResult {
  keys: AuthorizedKey[];
  problems: KeyProblem[];
  /** True when a private key was found anywhere in the text. */
  hasPrivateKey: boolean;
}

export const FRONT_DOOR = 'not usable by the built-in server; use the OpenSSH front door';
export const NEW_KEY_ADVICE = 'make a new key: ssh-keygen -t ed25519';

interface KeyTypeInfo {
  /** Curve name inside ECDSA blobs. */
  curve?: string;
  /** Uncompressed point length for ECDSA. */
  pointLen?: number;
  sk?: boolean;
}

const KEY_TYPES: Record<string, KeyTypeInfo> = {
  'ssh-ed25519': {},
  'ecdsa-sha2-nistp256': { curve: 'nistp256', pointLen: 65 },
  'ecdsa-sha2-nistp384': { curve: 'nistp384', pointLen: 97 },
  'ecdsa-sha2-nistp521': { curve: 'nistp521', pointLen: 133 },
  'ssh-rsa': {},
  'ssh-dss': {},
  'sk-ssh-ed25519@openssh.com': { sk: true },
  'sk-ecdsa-sha2-nistp256@openssh.com': { curve: 'nistp256', pointLen: 65, sk: true },
};

export function isKnownKeyType(t: string): boolean {
  return Object.hasOwn(KEY_TYPES, t);
}

const FLAG_OPTIONS = new Set([
  'agent-forwarding',
  'no-agent-forwarding',
  'cert-authority',
  'port-forwarding',
  'no-port-forwarding',
  'pty',
  'no-pty',
  'user-rc',
  'no-user-rc',
  'x11-forwarding',
  'no-x11-forwarding',
  'no-touch-required',
  'touch-required',
  'verify-required',
  'restrict',
]);
const VALUE_OPTIONS = new Set([
  'command',
  'environment',
  'expiry-time',
  'from',
  'permitopen',
  'permitlisten',
  'principals',
  'tunnel',
]);
/** Options whose restriction the built-in server cannot enforce: such keys go to the OpenSSH front door. */
const UNENFORCEABLE = new Set(['from', 'command']);

/** `SHA256:` + unpadded base64 of sha256(blob), as OpenSSH prints fingerprints. */
export function sshFingerprint(blob: Buffer): string {
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

/** Does a public-key algorithm named by an SSH client (e.g. `rsa-sha2-512`) belong to this key type? */
export function algoMatchesKeyType(algo: string, keyType: string): boolean {
  if (algo === keyType) return true;
  return keyType === 'ssh-rsa' && (algo === 'rsa-sha2-256' || algo === 'rsa-sha2-512');
}

/** Reads SSH wire strings from a key blob. */
class BlobReader {
  pos = 0;
  constructor(readonly buf: Buffer) {}
  string(): Buffer | undefined {
    if (this.pos + 4 > this.buf.length) return undefined;
    const len = this.buf.readUInt32BE(this.pos);
    if (len > this.buf.length - this.pos - 4) return undefined;
    const s = this.buf.subarray(this.pos + 4, this.pos + 4 + len);
    this.pos += 4 + len;
    return s;
  }
  get done(): boolean {
    return this.pos === this.buf.length;
  }
}

function mpintBits(m: Buffer): number {
  let i = 0;
  while (i < m.length && m[i] === 0) i++;
  if (i === m.length) return 0;
  return (m.length - i - 1) * 8 + (32 - Math.clz32(m[i]!));
}

type BlobCheck = { ok: true; bits: number } | { ok: false; message: string };

/** Validate the inside of a key blob against the declared type. */
export function checkKeyBlob(type: string, blob: Buffer): BlobCheck {
  const info = KEY_TYPES[type];
  if (!info) return { ok: false, message: `unknown key type \`${type}\`` };
  const r = new BlobReader(blob);
  const inner = r.string();
  if (!inner) return { ok: false, message: `key data is truncated or malformed (${type})` };
  const innerType = inner.toString('latin1');
  if (innerType !== type) {
    const shown = /^[\x21-\x7e]{1,64}$/.test(innerType) ? `\`${innerType}\`` : 'something else';
    return { ok: false, message: `key data is ${shown}, but the line says \`${type}\`` };
  }
  const bad: BlobCheck = { ok: false, message: `key data is truncated or malformed (${type})` };
  let bits = 0;
  if (type === 'ssh-ed25519' || type === 'sk-ssh-ed25519@openssh.com') {
    const pk = r.string();
    if (pk?.length !== 32) return bad;
    bits = 256;
  } else if (info.curve) {
    const curve = r.string();
    if (!curve || curve.toString('latin1') !== info.curve) return bad;
    const q = r.string();
    if (!q || q.length !== info.pointLen || q[0] !== 4) return bad;
    bits = info.curve === 'nistp256' ? 256 : info.curve === 'nistp384' ? 384 : 521;
  } else if (type === 'ssh-rsa') {
    const e = r.string();
    const n = r.string();
    if (!e || !n || mpintBits(e) === 0) return bad;
    bits = mpintBits(n);
  } else if (type === 'ssh-dss') {
    const p = r.string();
    const q = r.string();
    const g = r.string();
    const y = r.string();
    if (!p || !q || !g || !y) return bad;
    bits = mpintBits(p);
  }
  if (info.sk) {
    const application = r.string();
    if (!application) return bad;
  }
  if (!r.done) return { ok: false, message: `key data has trailing bytes (${type})` };
  return { ok: true, bits };
}

const BASE64_RE = /^[A-Za-z0-9+/]+={0,2}$/;

/** Strict base64: only the alphabet, correct padding, and it must re-encode to the same text. */
function decodeBase64(s: string): Buffer | undefined {
  if (!BASE64_RE.test(s) || s.length % 4 === 1) return undefined;
  const buf = Buffer.from(s, 'base64');
  if (buf.toString('base64').replace(/=+$/, '') !== s.replace(/=+$/, '')) return undefined;
  return buf;
}

const PRIVATE_BEGIN_RE = /^-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY( BLOCK)?-----/;
/** "openssh-key-v1\0" in base64: the body of an OpenSSH private key pasted without its armour. */
const OPENSSH_PRIVATE_BODY = 'b3BlbnNzaC1rZXktdjEA';

export function privateKeyMessage(what: string): string {
  return (
    `PRIVATE KEY (${what}): this is a secret key, and it is now public. Remove it (also from the git history), ` +
    `treat it as compromised, make a new key pair and add only the public key (the .pub file)`
  );
}

function parseOptions(s: string): { options: KeyOption[]; rest: string } | { error: string; at: number } {
  const options: KeyOption[] = [];
  let i = 0;
  while (true) {
    const m = /^[A-Za-z0-9-]+/.exec(s.slice(i));
    if (!m) return { error: 'bad option syntax', at: i };
    const name = m[0].toLowerCase();
    const nameAt = i;
    i += m[0].length;
    let value: string | undefined;
    if (s[i] === '=') {
      if (s[i + 1] !== '"') return { error: `option \`${m[0]}\` needs a quoted value: ${m[0]}="…"`, at: nameAt };
      i += 2;
      value = '';
      while (true) {
        if (i >= s.length) return { error: `unterminated quoted value of option \`${m[0]}\``, at: nameAt };
        const c = s[i]!;
        if (c === '\\' && s[i + 1] === '"') {
          value += '"';
          i += 2;
        } else if (c === '"') {
          i++;
          break;
        } else {
          value += c;
          i++;
        }
      }
      if (!VALUE_OPTIONS.has(name)) {
        return {
          error: FLAG_OPTIONS.has(name) ? `option \`${m[0]}\` takes no value` : `unknown option \`${m[0]}\``,
          at: nameAt,
        };
      }
    } else if (!FLAG_OPTIONS.has(name)) {
      return {
        error: VALUE_OPTIONS.has(name) ? `option \`${m[0]}\` needs a value: ${m[0]}="…"` : `unknown option \`${m[0]}\``,
        at: nameAt,
      };
    }
    options.push(value === undefined ? { name } : { name, value });
    if (s[i] === ',') {
      i++;
      continue;
    }
    if (i >= s.length || s[i] === ' ' || s[i] === '\t') return { options, rest: s.slice(i) };
    return { error: 'bad option syntax (options are separated by commas, without spaces)', at: i };
  }
}

/** sshd's expiry-time: YYYYMMDD[HHMM[SS]], local time, or UTC with a trailing Z. */
function parseExpiry(v: string): Date | undefined {
  const m = /^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?(Z)?$/.exec(v);
  if (!m) return undefined;
  const [, y, mo, d, h = '0', mi = '0', s = '0', z] = m;
  const args = [Number(y), Number(mo) - 1, Number(d), Number(h), Number(mi), Number(s)] as const;
  const date = z ? new Date(Date.UTC(...args)) : new Date(...args);
  return Number.isNaN(date.getTime()) ? undefined : date;
}

type LineResult = { key: AuthorizedKey } | { problem: Omit<KeyProblem, 'line'> } | undefined;

/**
 * Parse one authorized_keys line (no newline). Returns undefined for blank and comment lines. Private key armour is
 * not recognised here (that spans lines): use `parseAuthorizedKeys`.
 */
export function parseAuthorizedKeyLine(text: string, lineNo = 1): LineResult {
  const lead = /^[ \t]*/.exec(text)![0].length;
  const body = text.slice(lead).replace(/[\r\n]+$/, '');
  if (body === '' || body.startsWith('#')) return undefined;
  const err = (col: number, message: string, kind: KeyProblemKind = 'syntax') => ({
    problem: { col, severity: 'error' as const, kind, message },
  });

  let options: KeyOption[] = [];
  let rest = body;
  let restAt = lead;
  const firstWord = /^[^ \t]+/.exec(body)![0];
  if (!isKnownKeyType(firstWord) && !/-cert-v01@openssh\.com$/.test(firstWord)) {
    const parsed = parseOptions(body);
    if ('error' in parsed) {
      // An unknown word not followed by a key type is most likely a mistyped key type, not an option.
      const second = /^[^ \t]+[ \t]+([^ \t]+)/.exec(body)?.[1] ?? '';
      if (parsed.error.startsWith('unknown option') && !/[=,]/.test(firstWord) && !isKnownKeyType(second)) {
        return err(
          lead + 1,
          `unknown key type \`${firstWord}\` (expected ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa)`,
        );
      }
      return err(lead + parsed.at + 1, parsed.error);
    }
    options = parsed.options;
    const ws = /^[ \t]*/.exec(parsed.rest)![0].length;
    restAt = lead + (body.length - parsed.rest.length) + ws;
    rest = parsed.rest.slice(ws);
    if (rest === '') return err(lead + 1, 'options are not followed by a key');
  }
  const m = /^([^ \t]+)(?:[ \t]+([^ \t]+))?(?:[ \t]+(.*))?$/.exec(rest)!;
  const type = m[1]!;
  const b64 = m[2];
  const comment = (m[3] ?? '').trim();
  const typeCol = restAt + 1;
  if (/-cert-v01@openssh\.com$/.test(type)) {
    return err(
      typeCol,
      `a certificate (\`${type}\`) does not belong in authorized_keys; to trust a CA, add its public key with \`cert-authority\``,
    );
  }
  if (!isKnownKeyType(type)) {
    return err(typeCol, `unknown key type \`${type}\` (expected ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa)`);
  }
  if (!b64) return err(typeCol, `\`${type}\` is not followed by key data`);
  const blobCol = typeCol + type.length + (/^[^ \t]+([ \t]+)/.exec(rest)?.[1]?.length ?? 1);
  if (b64.startsWith(OPENSSH_PRIVATE_BODY)) {
    return err(blobCol, privateKeyMessage('OpenSSH private key data'), 'private-key');
  }
  const blob = decodeBase64(b64);
  if (!blob) return err(blobCol, 'key data is not valid base64');
  const check = checkKeyBlob(type, blob);
  if (!check.ok) return err(blobCol, check.message);
  if (type === 'ssh-dss') {
    return err(
      typeCol,
      `DSA (ssh-dss) keys are refused: they are weak and OpenSSH no longer accepts them (${NEW_KEY_ADVICE})`,
      'weak',
    );
  }
  if (type === 'ssh-rsa' && check.bits < 2048) {
    return err(
      typeCol,
      `RSA key of ${check.bits} bits is too weak: at least 2048 bits are required (${NEW_KEY_ADVICE})`,
      'weak',
    );
  }
  let expiresAt: Date | undefined;
  const expiry = options.find((o) => o.name === 'expiry-time');
  if (expiry) {
    expiresAt = parseExpiry(expiry.value ?? '');
    if (!expiresAt) return err(lead + 1, `bad expiry-time "${expiry.value}" (expected YYYYMMDD[HHMM[SS]][Z])`);
  }
  const certAuthority = options.some((o) => o.name === 'cert-authority');
  const info = KEY_TYPES[type]!;
  let unusableReason: string | undefined;
  if (info.sk) unusableReason = `security-key (FIDO) key \`${type}\`: ${FRONT_DOOR}`;
  else if (certAuthority) unusableReason = `cert-authority key: ${FRONT_DOOR}`;
  else {
    const o = options.find((x) => UNENFORCEABLE.has(x.name));
    if (o) unusableReason = `key restricted with \`${o.name}=\`: ${FRONT_DOOR}`;
  }
  const key: AuthorizedKey = {
    line: lineNo,
    col: typeCol,
    text,
    options,
    type,
    algo: type,
    blob,
    comment,
    fingerprint: sshFingerprint(blob),
    bits: check.bits,
    certAuthority,
    usable: unusableReason === undefined,
  };
  if (expiresAt) key.expiresAt = expiresAt;
  if (unusableReason) key.unusableReason = unusableReason;
  return { key };
}

/**
 * Parse an authorized_keys file. Every line is looked at; problems come with line and column. Private keys (PEM /
 * OpenSSH armour, PuTTY files) are reported once per block and their lines are not parsed further.
 */
export function parseAuthorizedKeys(input: string | Buffer, now = new Date()): AuthorizedKeysResult {
  const text = typeof input === 'string' ? input : input.toString('utf8');
  const lines = text.split('\n');
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  const keys: AuthorizedKey[] = [];
  const problems: KeyProblem[] = [];
  let hasPrivateKey = false;
  const seen = new Map<string, number>();
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!.replace(/\r$/, '');
    const lineNo = i + 1;
    const trimmed = raw.trim();
    const pem = PRIVATE_BEGIN_RE.exec(trimmed);
    if (pem) {
      hasPrivateKey = true;
      problems.push({
        line: lineNo,
        col: raw.indexOf('-') + 1,
        severity: 'error',
        kind: 'private-key',
        message: privateKeyMessage(pem[0]),
      });
      while (i + 1 < lines.length && !/^-----END /.test(lines[i]!.trim())) i++;
      continue;
    }
    if (/^PuTTY-User-Key-File-\d+:/.test(trimmed)) {
      hasPrivateKey = true;
      problems.push({
        line: lineNo,
        col: raw.indexOf('P') + 1,
        severity: 'error',
        kind: 'private-key',
        message: privateKeyMessage(`PuTTY key file, ${trimmed.split(':')[0]}`),
      });
      while (i + 1 < lines.length && !/^Private-MAC:/.test(lines[i]!.trim())) i++;
      continue;
    }
    if (/^---- BEGIN SSH2 PUBLIC KEY ----/.test(trimmed)) {
      problems.push({
        line: lineNo,
        col: raw.indexOf('-') + 1,
        severity: 'error',
        kind: 'format',
        message: 'RFC 4716 (SSH2) public key format is not accepted: convert it with `ssh-keygen -i -f FILE`',
      });
      while (i + 1 < lines.length && !/^---- END SSH2 PUBLIC KEY ----/.test(lines[i]!.trim())) i++;
      continue;
    }
    const r = parseAuthorizedKeyLine(raw, lineNo);
    if (!r) continue;
    if ('problem' in r) {
      if (r.problem.kind === 'private-key') hasPrivateKey = true;
      problems.push({ line: lineNo, ...r.problem });
      continue;
    }
    const k = r.key;
    const prev = seen.get(k.blob.toString('base64'));
    if (prev !== undefined) {
      problems.push({
        line: lineNo,
        col: k.col,
        severity: 'warning',
        kind: 'duplicate',
        message: `the same key (${k.fingerprint}) is already on line ${prev}`,
      });
      continue;
    }
    seen.set(k.blob.toString('base64'), lineNo);
    if (k.expiresAt && k.expiresAt.getTime() <= now.getTime()) {
      problems.push({
        line: lineNo,
        col: 1,
        severity: 'warning',
        kind: 'expired',
        message: `key ${k.fingerprint} expired at ${k.expiresAt.toISOString()} (expiry-time)`,
      });
    }
    keys.push(k);
  }
  return { keys, problems, hasPrivateKey };
}
