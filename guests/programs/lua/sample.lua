-- A Lua workout whose output must be the same in the guest and on the host
-- (tests/sdk.rs): no clocks, no addresses, no iteration order of hash keys.
local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
print("fib(25) =", fib(25))

-- floats, integers and their formatting
print(10 / 3, 7 // 2, 7 % -3, 2 ^ 0.5, 1e300 * 1e10, -0.0, 3 | 5, 1 << 62)
print(string.format("%.14g %g %e %.3f %5.1f|%-6d|%x", math.pi, 1e-5, 12345.678, 2 / 3, 9.96, 42, 255))
print(math.sqrt(2), math.sin(1), math.cos(1), math.exp(1), math.log(10), math.log(8, 2), math.atan(1, 2))
print(math.floor(-3.5), math.ceil(-3.5), math.fmod(7.5, 2), math.tointeger(2 ^ 53), tonumber("0x1p4"), tonumber("  12.5e1  "))

-- strings and patterns
local s = "The quick brown fox jumps over the lazy dog"
print(#s, s:upper(), s:reverse():sub(1, 9), select(2, s:gsub("o", "0")))
local words = {}
for w in s:gmatch("%a+") do words[#words + 1] = w:lower() end
table.sort(words)
print(table.concat(words, ","))
print(("%d-%s"):format(7, "x"):rep(3, "/"), s:find("fox"), s:match("(%a+) dog"))
print(string.pack and #string.pack("i4d", 1, 2.0), utf8.char(72, 228, 8364, 128512), utf8.len("häé"))

-- tables, closures, metatables
local counter = (function() local n = 0 return function() n = n + 1 return n end end)()
for _ = 1, 4 do counter() end
local V = {}
V.__index = V
V.__add = function(a, b) return setmetatable({ x = a.x + b.x, y = a.y + b.y }, V) end
V.__tostring = function(v) return "(" .. v.x .. "," .. v.y .. ")" end
local v = setmetatable({ x = 1, y = 2 }, V) + setmetatable({ x = 10, y = 20 }, V)
print("counter", counter(), "vector", tostring(v))

-- coroutines and errors (longjmp inside the C code)
local gen = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i * i) end end)
print("co", gen(), gen(), gen())
print("pcall", pcall(function() error({ code = 7 }) end), select(2, pcall(error, "boom", 0)))
print("xpcall", xpcall(function() return nil + 1 end, function(m) return "handled: " .. m end))

-- a sieve and a deterministic PRNG
local N, sieve, count = 20000, {}, 0
for i = 2, N do
  if not sieve[i] then count = count + 1 for j = i * i, N, i do sieve[j] = true end end
end
math.randomseed(42)
local r = {}
for i = 1, 5 do r[i] = math.random(1, 1000) end
print("primes below", N, count, "random", table.concat(r, " "), math.random() < 1)

-- garbage collection
local t = {}
for i = 1, 100000 do t[i] = { i, tostring(i) } end
t = nil
collectgarbage()
print("gc ok", collectgarbage("count") < 2048)
