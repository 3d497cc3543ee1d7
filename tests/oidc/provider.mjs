// A real OpenID provider for tests/test_sso.py: oidc-provider (a certified implementation, pinned in
// tests/package.json), run with Debian's nodejs on loopback. One confidential client (the proxy) and test accounts
// whose `groups` claim the proxy maps to roles. Its own development sign-in pages take any login and password:
// the login is the account. Usage: node oidc/provider.mjs PORT REDIRECT_URL CLIENT_SECRET
import Provider from "oidc-provider";

const [port, redirectUrl, clientSecret] = process.argv.slice(2);
const GROUPS = {
  alice: ["platform-admins"],
  bob: ["ads-leads", "staff"],
  carol: ["finance"],
  dave: ["interns"], // maps to no role: signed in at the provider, nothing in the proxy
};

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [{
    client_id: "embedding-proxy",
    client_secret: clientSecret,
    redirect_uris: [redirectUrl],
    grant_types: ["authorization_code"],
    response_types: ["code"],
    token_endpoint_auth_method: "client_secret_basic",
  }],
  claims: {openid: ["sub"], email: ["email", "email_verified"], groups: ["groups"]},
  conformIdTokenClaims: false, // the scopes' claims go into the ID token, as many company providers do for groups
  pkce: {required: () => true},
  features: {devInteractions: {enabled: true}},
  cookies: {keys: ["oidc-test-provider-cookie-key"]},
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return {sub: id, email: `${id}@example.com`, email_verified: true, groups: GROUPS[id] || []};
      },
    };
  },
});

provider.listen(Number(port), "127.0.0.1", () => {
  console.log(`oidc-provider listening on http://127.0.0.1:${port}`);
});
