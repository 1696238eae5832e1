# Users of the build box. To ask for access, open a pull request that
#
#   1. adds your public key(s) as keys/<you> (authorized_keys lines: the .pub file, never the private key), and
#   2. adds your entry below, in alphabetical order:
#
#        you = {
#          keys = ./keys/you;
#          vouchedBy = [ "<a trusted member who knows you>" ];
#        };
#
# `buildbox users add you --key ~/.ssh/id_ed25519.pub --vouched-by someone` does both for you.
#
# Fields: keys (required), trusted (a vouched-for community member: it never grants Nix trust on the box),
# sudo (an admin of the box), vouchedBy, jobs (a per-user build limit). Other fields are kept and ignored.
# This file is plain data: no functions, `let`, `import` or `${…}`; CI runs `buildbox users check` on every PR.
{
  "0x4A6F" = {
    trusted = true;
    keys = ./keys/0x4A6F;
    vouchedBy = [ "ada" ];
  };

  # admin of the box
  ada = {
    sudo = true;
    trusted = true;
    keys = ./keys/ada;
  };

  bob = {
    trusted = true;
    keys = ./keys/bob;
    vouchedBy = [ "ada" ];
  };

  carol = {
    keys = ./keys/carol;
    vouchedBy = [ "bob" ];
    jobs = 2;
    github = "carol-example"; # unknown fields are kept, not rejected
  };
}
